"""Precision policies for training: the dtypes of parameters, of computation and of the
model's output.

Applied to a model through its config. Whatever the policy, softmax, norms, router scores
and losses are computed in float32 inside the layers.

float16 is refused for training (``check_trainable``). Its 5-bit exponent flushes gradients
below ~6e-8 to zero, so float16 training needs loss scaling (scale the loss up, the gradients
back down, skip steps that overflow), which llmarch does not do. bfloat16 has float32's
exponent range, needs no scaling, and costs the same memory; float16 stays available for
inference and export, where no gradient is taken.
"""

from __future__ import annotations

import dataclasses

from llmarch.config import DTYPES, ModelConfig

TRAINABLE_DTYPES = tuple(d for d in DTYPES if d != "float16")
FP8_RECIPES = ("blockwise", "tensor", "delayed")  # llmarch.train.fp8.RECIPES, without importing jax code
FP8_HISTORY = 16  # llmarch.quant.fp8_delayed.DEFAULT_HISTORY
FP8_MAX_HISTORY = 4096  # llmarch.quant.fp8_delayed.MAX_HISTORY
_NO_FLOAT16 = (
    "float16 training needs loss scaling, which llmarch does not do; use 'bfloat16' "
    "(float32's exponent range at float16's size)"
)


@dataclasses.dataclass(frozen=True)
class Precision:
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    output_dtype: str = "float32"  # the logits' dtype
    # FP8 GEMMs for the blocks' linear layers (llmarch.train.fp8.RECIPES; llmarch.train.fp8).
    fp8: str | None = None
    # Steps of amax history behind the "delayed" recipe's scales (llmarch.quant.fp8_delayed).
    fp8_history: int = FP8_HISTORY

    def __post_init__(self):
        if self.fp8 is not None and self.fp8 not in FP8_RECIPES:
            raise ValueError(f"Precision.fp8={self.fp8!r} is invalid; allowed: {FP8_RECIPES} or None")
        h = self.fp8_history
        if isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= FP8_MAX_HISTORY:
            raise ValueError(
                f"Precision.fp8_history={h!r} is invalid: it must be an int from 1 to {FP8_MAX_HISTORY}"
            )
        for name in ("param_dtype", "compute_dtype", "output_dtype"):
            value = getattr(self, name)
            if value == "float16":
                raise ValueError(f"Precision.{name}={value!r} is invalid: {_NO_FLOAT16}")
            if value not in TRAINABLE_DTYPES:
                raise ValueError(f"Precision.{name}={value!r} is invalid; allowed: {TRAINABLE_DTYPES}")

    def apply(self, cfg: ModelConfig) -> ModelConfig:
        return cfg.replace(
            param_dtype=self.param_dtype, dtype=self.compute_dtype, logits_dtype=self.output_dtype
        )

    def prepare(self, model) -> None:
        """Switches ``model``'s block linears to FP8 when the policy says so (in place)."""
        if self.fp8 is not None:
            from llmarch.train.fp8 import install

            install(model, self.fp8, history=self.fp8_history)


POLICIES = {
    "float32": Precision(),
    # Mixed precision: float32 master weights and optimizer state, bfloat16 matmuls.
    "bf16": Precision(compute_dtype="bfloat16"),
    "bf16-logits": Precision(compute_dtype="bfloat16", output_dtype="bfloat16"),
    # Everything in bfloat16 (memory-lean; optimizer state follows the parameters).
    "pure-bf16": Precision("bfloat16", "bfloat16", "bfloat16"),
    # bf16 plus DeepSeek-V3's FP8 GEMMs (1x128 / 128x128 online scales) in the blocks' linears.
    "fp8": Precision(compute_dtype="bfloat16", fp8="blockwise"),
    # bf16 plus FP8 GEMMs with one current scale per tensor: the coarse-scaling comparison.
    "fp8-tensor": Precision(compute_dtype="bfloat16", fp8="tensor"),
    # bf16 plus FP8 GEMMs with TransformerEngine's per-tensor delayed scales (an amax history per
    # operand, carried across steps as model state; llmarch.quant.fp8_delayed).
    "fp8-delayed": Precision(compute_dtype="bfloat16", fp8="delayed"),
}


def policy(name: str, *, fp8_history: int | None = None) -> Precision:
    """The policy ``name``; ``fp8_history`` (if given) replaces its amax history length."""
    if name not in POLICIES:
        raise ValueError(f"precision={name!r} is unknown; allowed: {sorted(POLICIES)}")
    if fp8_history is None:
        return POLICIES[name]
    return dataclasses.replace(POLICIES[name], fp8_history=fp8_history)


def check_trainable(cfg: ModelConfig) -> None:
    """Raises ValueError naming the field when ``cfg`` would train in float16 (see above)."""
    for name in ("param_dtype", "dtype", "logits_dtype"):
        if getattr(cfg, name, None) == "float16":
            raise ValueError(f"ModelConfig.{name}='float16' is invalid for training: {_NO_FLOAT16}")
