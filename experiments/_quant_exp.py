"""Helpers of ``experiments/12_quantization.py`` (and ``notebooks/03_quantization.ipynb``): the
model trained on tinyshakespeare with a BPE tokenizer, held-out perplexity of a (quantized) model
and of the float model decoding through a quantized KV cache, and batch decode throughput."""

from __future__ import annotations

import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from llmarch.config import AttentionConfig, ModelConfig
from llmarch.data import BPETokenizer, load_documents, train_val_split
from llmarch.train.config import TrainConfig
from llmarch.train.optim import OptimizerConfig
from llmarch.train.trainer import load_rows, train

SHARED = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DATA = SHARED / "tinyshakespeare.txt"
VAL_FRACTION = 0.1


def model_config(quick: bool = False) -> ModelConfig:
    """Llama-style (RMSNorm, RoPE, SwiGLU, untied head): D=256, 4 blocks, F=768, 4 heads of 64,
    2048 BPE tokens (4.2M parameters). Every contracted dimension (256, 768) is a multiple of 128,
    so group sizes 32, 64 and 128 all divide K. ``quick``: D=128, 2 blocks, F=384."""
    if quick:
        return ModelConfig(
            vocab_size=1024,
            d_model=128,
            num_layers=2,
            ffn_dim=384,
            max_seq_len=512,
            attention=AttentionConfig(num_heads=2, num_kv_heads=2, head_dim=64),
            name="quant-quick",
        )
    return ModelConfig(
        vocab_size=2048,
        d_model=256,
        num_layers=4,
        ffn_dim=768,
        max_seq_len=512,
        attention=AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=64),
        name="quant-4m",
    )


def train_tokenizer(data: pathlib.Path, vocab_size: int, out: pathlib.Path) -> pathlib.Path:
    """Byte-level BPE learned on the training split only (the run's own split of ``data``), so no
    merge is fitted to the held-out text; returns the tokenizer.json written under ``out``."""
    train_docs, _ = train_val_split(load_documents(str(data)), VAL_FRACTION, seed=0)
    return BPETokenizer.train(train_docs, vocab_size=vocab_size).save(out / "tokenizer.json")


def train_config(
    run: pathlib.Path, steps: int, quick: bool = False, data: pathlib.Path = DATA
) -> TrainConfig:
    return TrainConfig(
        out_dir=str(run),
        model=model_config(quick),
        data=str(data),
        tokenizer=str(run.parent / f"{run.name}-tokenizer" / "tokenizer.json"),
        seq_len=256,
        batch_size=8,
        steps=steps,
        val_fraction=VAL_FRACTION,
        eval_every=max(steps // 4, 1),
        eval_batches=8,
        log_every=50,
        checkpoint_every=steps,
        keep_checkpoints=1,
        tensorboard=False,
        progress=False,
        optimizer=OptimizerConfig(
            learning_rate=2e-3, warmup_steps=max(1, min(125, steps // 10)), weight_decay=0.1
        ),
    )


def ensure_trained(run: pathlib.Path, steps: int, quick: bool = False, data: pathlib.Path = DATA) -> dict:
    """Trains the run in ``run`` (its tokenizer beside it, ``<run>-tokenizer/``) unless it is
    already trained ``steps`` steps (a finished run is reused, a partial one resumed). Returns
    ``{"seconds": training seconds, or None when reused, "tokens_per_s": mean, "val_loss": ...}``."""
    cfg = train_config(run, steps, quick, data)
    tok_path = pathlib.Path(cfg.tokenizer)
    if not tok_path.is_file():
        tok_path.parent.mkdir(parents=True, exist_ok=True)
        train_tokenizer(data, cfg.model.vocab_size, tok_path.parent)
    done = run / "DONE"
    seconds = None
    if not done.is_file():
        start = time.perf_counter()
        result = train(cfg, log=lambda s: print(s, flush=True))
        seconds = time.perf_counter() - start
        done.write_text(f"{result.step} {result.val_loss} {seconds:.1f}\n")
    step, val_loss, train_seconds = done.read_text().split()
    from llmarch.train import metrics

    records = metrics.read(run / "metrics.jsonl")
    speed = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    return {
        "steps": int(step),
        "val_loss": float(val_loss),
        "train_loss": losses[-1] if losses else float("nan"),
        "seconds": float(train_seconds),
        "reused": seconds is None,
        "tokens_per_s": float(np.mean(speed)) if speed else float("nan"),
        "config": cfg,
    }


def held_out(cfg: TrainConfig, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(calibration, evaluation)``: the first 128 rows of the training split ``[128, T]`` and
    the validation split's rows ``[R, T+1]`` (inputs and their next tokens), both int32."""
    train_rows, val_rows = load_rows(cfg.resolved())
    T = cfg.seq_len
    calib = np.stack([train_rows[i]["inputs"] for i in range(min(128, (train_rows.num_tokens - 1) // T))])
    tokens = np.asarray(val_rows.tokens, np.int32)
    n = (len(tokens) - 1) // T
    if rows is not None:
        n = min(n, rows)
    evaluation = np.stack([tokens[i * T : i * T + T + 1] for i in range(n)])  # [R, T+1]
    return calib.astype(np.int32), evaluation


def perplexity(model, evaluation: np.ndarray, batch: int = 16) -> float:
    """exp of the mean next-token loss of ``model`` over every position of ``evaluation`` rows
    (one full forward pass per row, no cache)."""

    @jax.jit
    def nll(tokens):
        logits = model(tokens[:, :-1]).astype(jnp.float32)  # [B, T, V]
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    total = 0.0
    for i in range(0, len(evaluation), batch):
        total += float(nll(jnp.asarray(evaluation[i : i + batch])))
    return math.exp(total / (evaluation.shape[0] * (evaluation.shape[1] - 1)))


def kv_perplexity(model, evaluation: np.ndarray, kv_cache_dtype: str, batch: int = 16) -> float:
    """Perplexity of ``model`` reading its keys and values back from a ``kv_cache_dtype`` cache.

    Each batch of rows runs once through an empty cache of its length: every layer writes the
    rows' keys and values to the cache (quantized per token and KV head), then every query
    attends over the dequantized cache (``layers/attention.py``: write, then attend), so no
    query sees a float key or value. Per-token scales make the stored bytes the same whether the
    tokens are written together or one decode step at a time; ``decode_matches`` checks that the
    logits equal those of teacher-forced decoding, one token per step, through the same cache."""
    B, T = min(batch, len(evaluation)), evaluation.shape[1] - 1

    @jax.jit
    def nll(tokens):
        positions = jnp.broadcast_to(jnp.arange(T), (tokens.shape[0], T))
        cache = model.init_cache(tokens.shape[0], T, kv_cache_dtype)
        logits = model(tokens[:, :-1], positions=positions, cache=cache).logits.astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, -1)  # [B, T, V]
        return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    total = 0.0
    for i in range(0, len(evaluation), B):
        total += float(nll(jnp.asarray(evaluation[i : i + B])))
    return math.exp(total / (evaluation.shape[0] * T))


def decode_matches(model, tokens: np.ndarray, kv_cache_dtype: str) -> tuple[float, float]:
    """``(max |logit difference|, |difference of the mean next-token loss|)`` between one pass
    through a ``kv_cache_dtype`` cache (``kv_perplexity``'s way) and teacher-forced decoding, one
    token per step, through such a cache, over the rows ``tokens [B, T]``. A batched pass and a
    one-token step compute keys and values in different float orders; in a quantized cache such a
    last-bit difference can move a value to the next quantization step, so the logits agree to
    about one step's effect, not to float rounding."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    full = model(jnp.asarray(tokens), positions=positions, cache=model.init_cache(B, T, kv_cache_dtype))

    @jax.jit
    def step(token, t, cache):
        out = model(token[:, None], positions=jnp.full((B, 1), t, jnp.int32), cache=cache)
        return out.logits[:, 0], out.cache

    cache, steps = model.init_cache(B, T, kv_cache_dtype), []
    for t in range(T):
        logits, cache = step(jnp.asarray(tokens[:, t]), t, cache)
        steps.append(logits)
    decoded = jnp.stack(steps, 1)  # [B, T, V]

    def loss(logits):  # mean next-token loss over positions 0..T-2
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
        return -float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1)))

    return float(jnp.max(jnp.abs(decoded - full.logits))), abs(loss(decoded) - loss(full.logits))


def decode_rates(
    models: dict, prompts: np.ndarray, new_tokens: int, batches: tuple[int, ...], repeats: int
) -> dict[tuple[str, int], float]:
    """Greedy decode tokens/s of each model through an ``Engine`` (paged cache, its default
    multi-step decode dispatch), ``{(name, batch): rate}``: decode tokens over the seconds of
    decode-only steps (prefill excluded), the median of ``repeats`` runs after one compiling run;
    the models take turns within each repeat, so other load on the machine falls on all alike."""
    from llmarch.inference import Engine, SamplingParams

    rates = {}
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    for b in batches:
        rows = [list(map(int, p)) for p in prompts[:b]]
        engines = {
            name: Engine(m, max_num_seqs=b, max_len=prompts.shape[1] + new_tokens + 1)
            for name, m in models.items()
        }
        for e in engines.values():
            e.generate(rows, params)  # compiles every step shape this workload uses
        runs = {name: [] for name in models}
        for _ in range(repeats):
            for name, e in engines.items():
                tokens, seconds = e.counters["decode_tokens"], e.counters["decode_step_seconds"]
                e.generate(rows, params)
                runs[name].append(
                    (e.counters["decode_tokens"] - tokens) / (e.counters["decode_step_seconds"] - seconds)
                )
        for name, r in runs.items():
            rates[(name, b)] = float(np.median(r))
            print(f"decode {name} batch {b}: {rates[(name, b)]:,.0f} tokens/s", flush=True)
    return rates


# -- the AWQ paper's table (Lin et al. 2024, Table 4: Llama-2-7B, WikiText-2 perplexity) ---------

PAPER = {
    "fp16": 5.47,
    ("rtn", "w4g128"): 5.73,
    ("gptq", "w4g128"): 5.69,
    ("awq", "w4g128"): 5.60,
    ("rtn", "w3g128"): 6.66,
    ("gptq", "w3g128"): 6.43,
    ("awq", "w3g128"): 6.24,
}


def paper_comparison(ppl: dict, float_ppl: float) -> str:
    """Markdown comparing the measured perplexity increases at W4g128 and W3g128 with the AWQ
    paper's, with sentences derived from the numbers: ``ppl[(method, setting)]`` (missing or
    None entries are reported as not measured)."""
    lines = [
        "| setting | method | paper ppl | paper increase | measured ppl | measured increase |",
        "|---|---|---|---|---|---|",
        f"| float | — | {PAPER['fp16']:.2f} (FP16) | — | {float_ppl:.3f} (float32) | — |",
    ]
    notes = []
    for setting in ("w4g128", "w3g128"):
        measured = {}
        for method in ("rtn", "gptq", "awq"):
            paper = PAPER[(method, setting)]
            p_inc = paper / PAPER["fp16"] - 1
            value = ppl.get((method, setting))
            if value is None:
                lines.append(f"| {setting} | {method} | {paper:.2f} | {p_inc:+.1%} | not measured | — |")
                continue
            measured[method] = value / float_ppl - 1
            lines.append(
                f"| {setting} | {method} | {paper:.2f} | {p_inc:+.1%} | {value:.3f} "
                f"| {measured[method]:+.1%} |"
            )
        if "rtn" in measured:
            p_rtn = PAPER[("rtn", setting)] / PAPER["fp16"] - 1
            ratio = measured["rtn"] / p_rtn if p_rtn else float("nan")
            notes.append(
                f"{setting.upper()} RTN costs {measured['rtn']:+.1%} perplexity here against "
                f"{p_rtn:+.1%} in the paper ({ratio:.1f}x the paper's relative damage)."
            )
        for method in ("gptq", "awq"):
            if method in measured and "rtn" in measured:
                recovered = 1 - measured[method] / measured["rtn"] if measured["rtn"] > 0 else float("nan")
                p_rec = 1 - (PAPER[(method, setting)] - PAPER["fp16"]) / (
                    PAPER[("rtn", setting)] - PAPER["fp16"]
                )
                verdict = "agrees" if (recovered > 0) == (p_rec > 0) else "disagrees"
                notes.append(
                    f"{setting.upper()} {method.upper()} removes {recovered:.0%} of RTN's perplexity "
                    f"increase here, {p_rec:.0%} in the paper: the direction {verdict}."
                )
        if {"gptq", "awq"} <= measured.keys():
            order = " < ".join(m.upper() for m in sorted(measured, key=measured.get))
            paper_order = "AWQ < GPTQ < RTN"
            notes.append(
                f"{setting.upper()} order by perplexity here: {order}; in the paper: {paper_order} "
                f"({'the same' if order == paper_order else 'different'})."
            )
    w4, w3 = ppl.get(("rtn", "w4g128")), ppl.get(("rtn", "w3g128"))
    if w4 is not None and w3 is not None:
        here = (w3 / float_ppl - 1) / max(w4 / float_ppl - 1, 1e-9)
        paper = (PAPER[("rtn", "w3g128")] / PAPER["fp16"] - 1) / (
            PAPER[("rtn", "w4g128")] / PAPER["fp16"] - 1
        )
        notes.append(
            f"Going from 4 to 3 bits multiplies RTN's perplexity increase by {here:.1f}x here and "
            f"{paper:.1f}x in the paper."
        )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)
