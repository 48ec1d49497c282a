"""``llmarch demo``: train a tiny model on the embedded corpus with the trainer, compare its
validation loss with the corpus' unigram entropy, and sample text from it.

Runs anywhere Python runs: the corpus is Python's own documentation and the tokenizer is
byte-level, so nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import tempfile

import jax
import numpy as np

from llmarch import accounting, presets, run_format
from llmarch.data import ByteTokenizer
from llmarch.inference import generate
from llmarch.train import metrics
from llmarch.train.config import TrainConfig
from llmarch.train.optim import OptimizerConfig
from llmarch.train.trainer import train


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
    out_dir: str | None = None  # None: a temporary directory

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)} is invalid: must be > 0")
        if self.sample_tokens < 0:
            raise ValueError(f"DemoConfig.sample_tokens={self.sample_tokens} is invalid: must be >= 0")


def unigram_entropy(ids: np.ndarray) -> float:
    """Entropy in nats of the tokens' frequencies: the loss of the best context-free model."""
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def run(cfg: DemoConfig, *, log=print) -> dict[str, float]:
    """Trains, evaluates and samples; returns the headline numbers."""
    model_cfg = presets.get(cfg.preset)
    if cfg.seq_len > model_cfg.max_seq_len:  # checked here too, so the message names the demo
        raise ValueError(
            f"DemoConfig.seq_len={cfg.seq_len} exceeds the preset's max_seq_len={model_cfg.max_seq_len}"
        )
    out_dir = cfg.out_dir or tempfile.mkdtemp(prefix="llmarch-demo-")
    train_cfg = TrainConfig(
        out_dir=out_dir,
        preset=cfg.preset,
        data="default",
        tokenizer="byte",
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
        eval_every=cfg.steps,
        eval_batches=cfg.eval_batches,
        log_every=min(25, cfg.steps),
        checkpoint_every=cfg.steps,
        keep_checkpoints=1,
        tensorboard=False,
        optimizer=OptimizerConfig(
            learning_rate=cfg.learning_rate, warmup_steps=max(1, cfg.steps // 20), weight_decay=0.01
        ),
    )
    log(
        f"model: {cfg.preset}, {accounting.param_count(model_cfg):,} parameters, on "
        f"{jax.devices()[0].platform}; corpus: Python's documentation (byte tokens); run in {out_dir}"
    )
    result = train(train_cfg, log=log)
    records = [r for r in metrics.read(f"{out_dir}/{run_format.METRICS_FILE}") if "tokens_per_s" in r]
    tokens_per_s = float(np.mean([r["tokens_per_s"] for r in records])) if records else float("nan")
    baseline = unigram_entropy(result.train_rows.tokens)
    train_loss = result.losses[cfg.steps] if cfg.steps in result.losses else float("nan")
    log(
        f"train loss {train_loss:.3f} | validation loss {result.val_loss:.3f} nats/byte | "
        f"unigram entropy {baseline:.3f} | {tokens_per_s:,.0f} tokens/s"
    )
    if cfg.sample_tokens:
        tok = ByteTokenizer()
        prompt = tok.encode(cfg.prompt)[None]
        n = min(cfg.sample_tokens, model_cfg.max_seq_len - prompt.shape[1])
        out = generate(result.model(), prompt, n, temperature=0.8, top_k=40, seed=cfg.seed)
        log("sample: " + tok.decode(out[0]))
    return {
        "train_loss": train_loss,
        "val_loss": result.val_loss,
        "unigram_entropy": baseline,
        "tokens_per_s": tokens_per_s,
    }
