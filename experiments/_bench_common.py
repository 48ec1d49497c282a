"""Measuring helpers shared by the experiments and ``experiments/bench.py``: interleaved timing,
a random Llama built in ``transformers`` and loaded into llmarch with the same weights, and the
results table with its README section (written by the harness, never typed in)."""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each ``fn()`` over ``repeats`` rounds that run every fn once in turn, so
    load from other processes falls on all of them alike. Each fn must block until its work is
    done (``jax.block_until_ready``, a torch step); compile or warm them before calling this."""
    if repeats <= 0:
        raise ValueError(f"repeats={repeats} is invalid: must be > 0")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def load_average() -> float:
    """The 1-minute load average (0 where the OS has none): how busy the machine was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def random_llama(
    *,
    vocab: int,
    d_model: int,
    layers: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    max_len: int = 1024,
    seed: int = 0,
):
    """``(hf_model, model, cfg)``: a transformers ``LlamaForCausalLM`` with random float32
    weights (untied, no BOS/EOS) and the same weights in llmarch, through ``save_pretrained`` and
    ``llmarch.hf.load_pretrained``, so both sides compute the same function."""
    import torch
    import transformers

    import llmarch

    hf_config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=d_model // heads,
        max_position_embeddings=max_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        model, cfg = llmarch.hf.load_pretrained(tmp)
    return hf_model, model, cfg


# -- the results table ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One workload's line: llmarch's figure, the peer's, their ratio (llmarch over peer, higher
    is better for llmarch; None when there is no peer figure), the goal, whether it is met (None:
    cannot be judged), and notes (derived figures, conditions)."""

    workload: str
    llmarch: str
    peer: str
    ratio: float | None
    goal: str
    met: bool | None
    notes: str = ""


def format_ratio(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}×"


def format_met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "—"}[met]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[Row]) -> str:
    """The rows as a markdown table (pipes inside cells escaped)."""
    lines = [
        "| workload | llmarch | peer | ratio | goal | met | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (r.workload, r.llmarch, r.peer, format_ratio(r.ratio), r.goal, format_met(r.met), r.notes)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def replace_section(text: str, body: str, start: str = README_START, end: str = README_END) -> str:
    """``text`` with what lies between the ``start`` and ``end`` marker lines replaced by ``body``
    (the markers stay). Raises ValueError unless each marker occurs exactly once, start first."""
    for marker in (start, end):
        if text.count(marker) != 1:
            raise ValueError(f"marker {marker!r} occurs {text.count(marker)} times: it must occur once")
    head, rest = text.split(start)
    if end not in rest:
        raise ValueError(f"marker {end!r} comes before {start!r}: it must follow it")
    _, tail = rest.split(end)
    return f"{head}{start}\n{body.strip()}\n{end}{tail}"
