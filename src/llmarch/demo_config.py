"""``DemoConfig``: the settings of ``llmarch demo`` (``llmarch.demo``), apart from the demo itself so
that the command line reads its fields without importing the trainer."""

from __future__ import annotations

import dataclasses

from llmarch import presets

# The comparison's models: one per family of the library, sized to about the same activated
# parameters per token (144K-165K; ``llmarch.accounting``), so their losses compare like for like.
COMPARED = ("tiny-dense", "tiny-moe", "tiny-ultramem", "tiny-mla")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    quick: bool = False  # train one model (--preset), print its losses and a sample; no comparison
    preset: str = "tiny-dense"  # --quick's model, a tiny-* preset: it trains on a CPU in about a minute
    models: tuple[str, ...] = COMPARED  # the comparison's models, tiny-* presets trained side by side
    steps: int = 300  # each model's: the four of the comparison take about 3.5 minutes on 2 CPU cores
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    seed: int = 0
    sample_tokens: int = 200
    prompt: str = "The "
    eval_batches: int = 8
    decode_tokens: int = 128  # the comparison's batch-1 greedy decode through the Engine, per model
    out_dir: str | None = None  # None: a temporary directory

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)} is invalid: must be > 0")
        if self.sample_tokens < 0:
            raise ValueError(f"DemoConfig.sample_tokens={self.sample_tokens} is invalid: must be >= 0")
        if self.decode_tokens < 2:  # the rate is the time between the first and the last token
            raise ValueError(f"DemoConfig.decode_tokens={self.decode_tokens} is invalid: must be >= 2")
        tiny = tuple(n for n in presets.names() if n.startswith("tiny-"))
        if self.preset not in tiny:
            raise ValueError(f"DemoConfig.preset={self.preset!r} is invalid: must be one of {tiny}")
        models = tuple(self.models)
        bad = [m for m in models if m not in tiny]
        if not models or bad or len(set(models)) != len(models):
            raise ValueError(
                f"DemoConfig.models={list(models)!r} is invalid: must be one or more distinct presets of "
                f"{tiny}" + (f" ({bad[0]!r} is not)" if bad else "")
            )
        object.__setattr__(self, "models", models)  # a list given in Python: stored as the tuple
