"""``llmarch demo``: what llmarch is for, in one command that downloads nothing.

By default it trains four tiny decoders side by side on the embedded corpus (Python's own
documentation, byte tokens) with the same data, steps and settings: dense, mixture of experts,
UltraMem memory layer and multi-head latent attention (``DemoConfig.models``), sized to about the
same activated parameters per token. It prints one table: parameters and activated parameters
per token and KV-cache bytes per token (``llmarch.accounting``), validation loss, and batch-1
greedy decode tokens/s through the serving ``Engine``; it writes the table to ``OUT/demo.md`` and
the runs' loss curves to ``OUT/demo.png`` (``llmarch.plot``, when matplotlib is installed).

``--quick`` (``run``) trains one model, compares its validation loss with the corpus' unigram
entropy and samples text from it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from llmarch import accounting, machine, presets, run_format
from llmarch.config import ModelConfig
from llmarch.data import ByteTokenizer
from llmarch.demo_config import DemoConfig  # also llmarch.demo.DemoConfig
from llmarch.inference import Engine, SamplingParams, generate
from llmarch.train import metrics
from llmarch.train.config import TrainConfig
from llmarch.train.optim import OptimizerConfig
from llmarch.train.trainer import train

logger = logging.getLogger(__name__)

DECODE_RUNS = 5  # timed decode runs per model; the table gives their median
PLOT_METRICS = ("loss", "val_loss")
NO_MATPLOTLIB = "plot not written: matplotlib is not installed (pip install 'llmarch[plot]')"


def unigram_entropy(ids: np.ndarray) -> float:
    """Entropy in nats of the tokens' frequencies: the loss of the best context-free model."""
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _check_lengths(cfg: DemoConfig, names: Sequence[str], longest: int) -> None:
    """Raises ValueError, naming the demo's field, when a sequence is longer than a model allows."""
    for name in names:
        limit = presets.get(name).max_seq_len
        if cfg.seq_len > limit:
            raise ValueError(f"DemoConfig.seq_len={cfg.seq_len} exceeds the preset's max_seq_len={limit}")
        if longest > limit:
            raise ValueError(
                f"DemoConfig.decode_tokens={cfg.decode_tokens} is invalid: with the prompt, "
                f"{longest} tokens exceed {name}'s max_seq_len={limit}"
            )


def _train_config(
    cfg: DemoConfig, preset: str, out_dir: str, steps: int, *, eval_every: int, log_every: int
) -> TrainConfig:
    return TrainConfig(
        out_dir=out_dir,
        preset=preset,
        data="default",
        tokenizer="byte",
        steps=steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
        eval_every=eval_every,
        eval_batches=cfg.eval_batches,
        log_every=log_every,
        checkpoint_every=steps,
        keep_checkpoints=1,
        tensorboard=False,
        optimizer=OptimizerConfig(
            learning_rate=cfg.learning_rate, warmup_steps=max(1, steps // 20), weight_decay=0.01
        ),
    )


def run(cfg: DemoConfig, *, log=None) -> dict[str, float]:
    """``llmarch demo --quick``: trains ``cfg.preset``, evaluates and samples; returns the headline
    numbers. Its own lines (the model, the losses, the sample) are printed, the trainer's logged;
    ``log`` receives both instead."""
    say = log or print
    steps = cfg.steps
    model_cfg = presets.get(cfg.preset)
    _check_lengths(cfg, [cfg.preset], 0)  # checked here too, so the message names the demo
    out_dir = cfg.out_dir or tempfile.mkdtemp(prefix="llmarch-demo-")
    train_cfg = _train_config(cfg, cfg.preset, out_dir, steps, eval_every=steps, log_every=min(25, steps))
    say(
        f"model: {cfg.preset}, {accounting.param_count(model_cfg):,} parameters, on "
        f"{jax.devices()[0].platform}; corpus: Python's documentation (byte tokens); run in {out_dir}"
    )
    result = train(train_cfg, log=log)
    records = [r for r in metrics.read(f"{out_dir}/{run_format.METRICS_FILE}") if "tokens_per_s" in r]
    tokens_per_s = float(np.mean([r["tokens_per_s"] for r in records])) if records else float("nan")
    baseline = unigram_entropy(result.train_rows.tokens)
    train_loss = result.losses[steps] if steps in result.losses else float("nan")
    say(
        f"train loss {train_loss:.3f} | validation loss {result.val_loss:.3f} nats/byte | "
        f"unigram entropy {baseline:.3f} | {tokens_per_s:,.0f} tokens/s"
    )
    if cfg.sample_tokens:
        tok = ByteTokenizer()
        prompt = tok.encode(cfg.prompt)[None]
        n = min(cfg.sample_tokens, model_cfg.max_seq_len - prompt.shape[1])
        out = generate(result.model(), prompt, n, temperature=0.8, top_k=40, seed=cfg.seed)
        say("sample: " + tok.decode(out[0]))
    return {
        "train_loss": train_loss,
        "val_loss": result.val_loss,
        "unigram_entropy": baseline,
        "tokens_per_s": tokens_per_s,
    }


# -- the comparison ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One model of the comparison: its accounting (from the config) and its measurements."""

    model: str  # the preset
    architecture: str
    params: int
    active_params: int  # per token: an MoE's top-k experts, a memory layer's rows read
    kv_bytes_per_token: int  # over all layers, in the model's dtype
    val_loss: float  # nats per token on the held-out text
    decode_tokens_per_s: float
    greedy: str  # the decoded continuation of the prompt
    run_dir: Path


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What ``compare`` measured and wrote. ``plot`` is None when it was not drawn (``note`` says why)."""

    rows: list[Row]
    caption: str
    table: str  # Markdown, aligned so that it reads as well in a terminal
    markdown: Path  # OUT/demo.md
    plot: Path | None
    note: str | None
    seconds: float

    def text(self) -> str:
        """The command's output: the caption, the table and where the files are."""
        written = [f"wrote {self.markdown}", f"wrote {self.plot}" if self.plot else self.note]
        return "\n".join([self.caption, "", self.table, "", *written])


def architecture(cfg: ModelConfig) -> str:
    """The attention and FFN of a config in a few words: "GQA 4/2 heads, MoE top-2 of 8"."""
    parts = []
    for kind in dict.fromkeys(b.attention for b in cfg.layer_blocks):
        if kind == "mla":
            parts.append(
                f"MLA {cfg.mla.num_heads} heads, latent {cfg.mla.kv_lora_rank}+{cfg.mla.qk_rope_head_dim}"
            )
        elif kind == "mha":
            n, k = cfg.attention.num_heads, cfg.attention.num_kv_heads
            parts.append(f"MHA {n} heads" if n == k else f"{'MQA' if k == 1 else 'GQA'} {n}/{k} heads")
        else:
            parts.append(kind)
    for kind in dict.fromkeys(b.ffn for b in cfg.layer_blocks):
        if kind == "moe":
            parts.append(f"MoE top-{cfg.moe.top_k} of {cfg.moe.num_experts}")
        else:
            parts.append({"swiglu": "SwiGLU", "pkm": "PKM"}.get(kind, kind))
    if cfg.skip_layers:
        mem = cfg.memory
        parts.append(
            f"{cfg.skip_kind.replace('ultramem', 'UltraMem')} top-{mem.topk} of {mem.num_keys}² keys"
        )
    return ", ".join(parts)


def decode_tokens_per_s(
    model, prompt: Sequence[int], n: int, *, runs: int = DECODE_RUNS
) -> tuple[float, list[int]]:
    """Batch-1 greedy decode through the ``Engine``: ``(tokens/s, the tokens)``. A run's rate is its
    ``n - 1`` tokens after the first over the time from the first to the last (the prompt's
    prefill left out); the median of ``runs`` runs after two warm-up runs. Prefix caching is off so
    that every run computes the same steps (a cached prompt would skip its prefill); the second
    warm-up is there because the first run can leave the cache pools committed to the device,
    which the next run's programs are compiled for anew."""
    engine = Engine(
        model, max_num_seqs=1, max_len=len(prompt) + n, min_decode_rows=1, enable_prefix_caching=False
    )
    params = SamplingParams(max_tokens=n, temperature=0.0)
    for _ in range(2):
        engine.generate([list(prompt)], params)
    rates, tokens = [], []
    for _ in range(runs):
        out = engine.generate([list(prompt)], params)[0]
        rates.append(len(out.token_latencies) / max(sum(out.token_latencies), 1e-9))
        tokens = out.token_ids
    return statistics.median(rates), tokens


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right, strict=True))
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def table(rows: Sequence[Row]) -> str:
    """The comparison as a Markdown table, one row per model."""
    header = [
        "model",
        "architecture",
        "parameters",
        "activated / token",
        "KV cache B/token",
        "val loss (nats/token)",
        "decode tokens/s",
    ]
    cells = [
        [
            r.model,
            r.architecture,
            f"{r.params:,}",
            f"{r.active_params:,}",
            f"{r.kv_bytes_per_token:,}",
            f"{r.val_loss:.3f}",
            f"{r.decode_tokens_per_s:,.0f}",
        ]
        for r in rows
    ]
    return _markdown_table(header, cells, [False, False, True, True, True, True, True])


def _plot(run_dirs: Sequence[Path], out: Path, steps: int) -> str | None:
    """Draws the runs' training and validation losses into ``out``; returns why not, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return NO_MATPLOTLIB
    from llmarch.plot import plot_runs

    # The per-step training loss is noisy: drawn under its moving average. The validation loss,
    # evaluated 5 times, is drawn as it is.
    plot_runs(run_dirs, out, metrics=PLOT_METRICS, smooth={"loss": max(1, steps // 15)})
    return None


def _load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def compare(cfg: DemoConfig, *, log: Callable[[str], None] | None = None) -> Comparison:
    """``llmarch demo``: trains ``cfg.models`` one after another with the same data, steps, batch,
    sequence length, learning rate and seed (each in ``OUT/<preset>``), measures each one's
    decode rate, and writes the table (``OUT/demo.md``) and the loss curves (``OUT/demo.png``).

    Args:
      log: receives the progress lines, the trainer's included; None: they are logged.

    Raises:
      ValueError: a sequence longer than a model allows, or ``out_dir`` already holding a run of
        one of the models (checked before anything is trained).
    """
    info = log or logger.info
    start = time.perf_counter()
    load = _load_average()
    steps = cfg.steps
    tok = ByteTokenizer()
    prompt = tok.encode(cfg.prompt).tolist()
    _check_lengths(cfg, cfg.models, len(prompt) + cfg.decode_tokens)
    out = Path(cfg.out_dir or tempfile.mkdtemp(prefix="llmarch-demo-"))
    for name in cfg.models:
        if (out / name).exists() and any((out / name).iterdir()):
            raise ValueError(
                f"DemoConfig.out_dir={str(out)!r} already holds a run of {name} ({out / name}): "
                "give another --out, or remove it"
            )
    rows, entropy = [], float("nan")
    for i, name in enumerate(cfg.models, 1):
        model_cfg = presets.get(name)
        info(f"[{i}/{len(cfg.models)}] {name} ({architecture(model_cfg)}): {steps} steps in {out / name}")
        train_cfg = _train_config(
            cfg, name, str(out / name), steps, eval_every=max(1, steps // 5), log_every=1
        )
        result = train(train_cfg, log=log)
        entropy = unigram_entropy(result.train_rows.tokens)
        rate, tokens = decode_tokens_per_s(result.model(), prompt, cfg.decode_tokens)
        greedy = tok.decode(tokens)
        info(f"{name}: validation loss {result.val_loss:.3f}, decode {rate:,.0f} tokens/s, greedy {greedy!r}")
        rows.append(
            Row(
                model=name,
                architecture=architecture(model_cfg),
                params=accounting.param_count(model_cfg),
                active_params=accounting.active_param_count(model_cfg),
                kv_bytes_per_token=accounting.kv_cache_bytes_per_token(model_cfg),
                val_loss=float(result.val_loss),
                decode_tokens_per_s=rate,
                greedy=greedy,
                run_dir=out / name,
            )
        )
    active = [r.active_params for r in rows]
    dtypes = sorted({presets.get(r.model).dtype for r in rows})
    caption = (
        f"{len(rows)} tiny decoders sized to about the same activated parameters per token "
        f"({min(active):,} to {max(active):,}), each trained {steps} steps of {cfg.batch_size}x{cfg.seq_len} "
        f"byte tokens of Python's documentation with the same data order, learning rate and seed. "
        f"Validation loss: nats per token on held-out text ({cfg.eval_batches} batches; byte frequencies "
        f"alone score {entropy:.3f}). KV cache: bytes per token over all layers in {'/'.join(dtypes)}. "
        f"Decode: batch-1 greedy through the Engine, {cfg.decode_tokens} tokens after {cfg.prompt!r}, "
        f"median of {DECODE_RUNS} runs after warm-up, on {jax.devices()[0].platform}. Models this small "
        "and runs this short say little about the architectures at scale: the experiments/ scripts "
        "measure each technique on its own."
    )
    body = table(rows)
    png = out / "demo.png"
    note = _plot([r.run_dir for r in rows], png, steps)
    seconds = time.perf_counter() - start
    md = out / "demo.md"
    md.write_text(
        "# llmarch demo\n\n"
        f"{caption}\n\n{body}\n\n"
        + ("![loss curves](demo.png)\n\n" if note is None else f"{note}\n\n")
        + f"Greedy continuations of {cfg.prompt!r}:\n\n"
        + "".join(f"- {r.model}: `{r.greedy!r}`\n" for r in rows)
        + f"\nTook {seconds / 60:.1f} min on {machine.describe()}; load average {load:.1f} at the start, "
        f"{_load_average():.1f} at the end (other work on the machine slows every number but the losses).\n"
    )
    return Comparison(rows, caption, body, md, None if note else png, note, seconds)


def main(cfg: DemoConfig) -> None:
    """The ``llmarch demo`` command: the comparison, its output on stdout; ``--quick``: ``run``."""
    if cfg.quick:
        run(cfg)
    else:
        print(compare(cfg).text())
