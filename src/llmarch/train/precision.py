"""Precision policies: the dtypes of parameters, of computation and of the model's output.

Applied to a model through its config. Whatever the policy, softmax, norms, router scores
and losses are computed in float32 inside the layers.
"""

from __future__ import annotations

import dataclasses

from llmarch.config import DTYPES, ModelConfig


@dataclasses.dataclass(frozen=True)
class Precision:
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    output_dtype: str = "float32"  # the logits' dtype

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype", "output_dtype"):
            value = getattr(self, name)
            if value not in DTYPES:
                raise ValueError(f"Precision.{name}={value!r} is invalid; allowed: {DTYPES}")

    def apply(self, cfg: ModelConfig) -> ModelConfig:
        return cfg.replace(
            param_dtype=self.param_dtype, dtype=self.compute_dtype, logits_dtype=self.output_dtype
        )


POLICIES = {
    "float32": Precision(),
    # Mixed precision: float32 master weights and optimizer state, bfloat16 matmuls.
    "bf16": Precision(compute_dtype="bfloat16"),
    "bf16-logits": Precision(compute_dtype="bfloat16", output_dtype="bfloat16"),
    # Everything in bfloat16 (memory-lean; optimizer state follows the parameters).
    "pure-bf16": Precision("bfloat16", "bfloat16", "bfloat16"),
}


def policy(name: str) -> Precision:
    if name not in POLICIES:
        raise ValueError(f"precision={name!r} is unknown; allowed: {sorted(POLICIES)}")
    return POLICIES[name]
