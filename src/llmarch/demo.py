"""``llmarch demo``: train a tiny model on the embedded corpus, report losses, sample text.

Runs anywhere Python runs: the corpus is Python's own documentation and the tokenizer is
byte-level, so nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from llmarch import accounting, presets
from llmarch.data import ByteTokenizer, default_corpus
from llmarch.inference import generate
from llmarch.model import Transformer
from llmarch.train.step import cross_entropy, make_train_step


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    preset: str = "tiny-dense"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    seed: int = 0
    sample_tokens: int = 200
    prompt: str = "The "
    eval_batches: int = 8

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)} is invalid: must be > 0")
        if self.sample_tokens < 0:
            raise ValueError(f"DemoConfig.sample_tokens={self.sample_tokens} is invalid: must be >= 0")


def _windows(ids: np.ndarray, rng: np.random.Generator, batch: int, length: int) -> dict[str, np.ndarray]:
    starts = rng.integers(0, len(ids) - length - 1, size=batch)
    rows = np.stack([ids[s : s + length + 1] for s in starts])  # [B,T+1]
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def unigram_entropy(ids: np.ndarray) -> float:
    """Entropy in nats of the corpus' token frequencies: the loss of the best context-free model."""
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def run(cfg: DemoConfig, *, log=print) -> dict[str, float]:
    """Trains, evaluates and samples; returns the headline numbers."""
    model_cfg = presets.get(cfg.preset)
    tok = ByteTokenizer()
    if model_cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"preset {cfg.preset!r} has vocab_size={model_cfg.vocab_size} < the byte "
                         f"tokenizer's {tok.vocab_size}")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"DemoConfig.seq_len={cfg.seq_len} exceeds the preset's "
                         f"max_seq_len={model_cfg.max_seq_len}")
    ids = tok.encode(default_corpus())
    split = int(0.95 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    log(f"corpus: Python's documentation, {len(ids):,} bytes "
        f"(train {len(train_ids):,}, validation {len(val_ids):,})")

    model = Transformer(model_cfg, rngs=nnx.Rngs(cfg.seed))
    log(f"model: {cfg.preset}, {accounting.param_count(model_cfg):,} parameters, "
        f"on {jax.devices()[0].platform}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(1, cfg.steps // 20),
                                                  cfg.steps, end_value=cfg.learning_rate / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx)

    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train", mininterval=1.0)
    for i in bar:
        params, opt_state, metrics = step(params, rest, opt_state,
                                          _windows(train_ids, rng, cfg.batch_size, cfg.seq_len))
        if i % 25 == 0 or i == cfg.steps - 1:
            bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
    train_loss = float(metrics["loss"])
    elapsed = time.perf_counter() - start

    @jax.jit
    def eval_loss(params, batch):
        logits = nnx.merge(graphdef, params, rest)(batch["inputs"])
        return cross_entropy(logits, batch["targets"])

    val_rng = np.random.default_rng(12345)  # the same validation windows on every run
    val_loss = float(np.mean([eval_loss(params, _windows(val_ids, val_rng, cfg.batch_size, cfg.seq_len))
                              for _ in range(cfg.eval_batches)]))
    baseline = unigram_entropy(train_ids)
    tokens_per_s = cfg.steps * cfg.batch_size * cfg.seq_len / elapsed
    log(f"trained {cfg.steps} steps in {elapsed:.1f}s ({tokens_per_s:,.0f} tokens/s)")
    log(f"train loss {train_loss:.3f} | validation loss {val_loss:.3f} nats/byte | "
        f"unigram entropy {baseline:.3f}")
    if cfg.sample_tokens:
        trained = nnx.merge(graphdef, params, rest)
        prompt = tok.encode(cfg.prompt)[None]
        n = min(cfg.sample_tokens, model_cfg.max_seq_len - prompt.shape[1])
        out = generate(trained, prompt, n, temperature=0.8, top_k=40, seed=cfg.seed)
        log("sample: " + tok.decode(out[0]))
    return {"train_loss": train_loss, "val_loss": val_loss, "unigram_entropy": baseline,
            "tokens_per_s": tokens_per_s}
