"""``LoraConfig``: which linear weights get low-rank adapters, their rank, scale and dropout, and
(QLoRA) how the frozen base is quantized."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmarch.checks import INT32_MAX, check_int, check_number, fail
from llmarch.quant.config import QuantConfig

# The weights adapters can target, by the role in their name (``w_<role>_<axes>``, so ``w_q_dnh``
# is "q"): attention ("q", "k", "v", "o"), the FFN ("gate", "up", "down", shared experts included),
# MLA ("down_q", "uq", "qr", "dkv", "uk", "uv", "kr"), memory layers ("q_row", "q_col", "out"), and
# the untied output projection ("lm_head"). MoE's routed experts ([E, D, F] arrays multiplied by
# the dispatch code) and its router are never adapted.
TARGETS = (
    "q",
    "k",
    "v",
    "o",
    "gate",
    "up",
    "down",
    "down_q",
    "uq",
    "qr",
    "dkv",
    "uk",
    "uv",
    "kr",
    "q_row",
    "q_col",
    "out",
    "lm_head",
)
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
BASE_QUANT_METHODS = ("rtn", "fp8")  # quantized on load without calibration data


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adaptation (Hu et al. 2021): each targeted weight ``W`` stays frozen and the layer
    computes ``x·W + (alpha/rank)·dropout(x)·A·B`` with trainable ``A [K, rank]`` and ``B [rank, N]``
    (``B`` starts at zero, so training starts from the base model exactly).

    Attributes:
      rank: r, the adapters' inner dimension (>= 1, at most each weight's ``min(K, N)``).
      alpha: the scale numerator: the update is scaled by ``alpha / rank``.
      dropout: the probability of zeroing an adapter input in training (0 <= p < 1); the frozen
        path sees the input unchanged, as in PEFT.
      targets: which weights get adapters, by role (``TARGETS``).
      base_quant: QLoRA (Dettmers et al. 2023): the frozen base's linear weights are quantized when
        it is loaded (``QuantConfig`` with method "rtn" or "fp8"; no calibration), the adapters stay
        float; None keeps the base as it is stored.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_LINEAR
    base_quant: QuantConfig | None = None

    def __post_init__(self):
        owner = "LoraConfig"
        check_int(owner, "rank", self.rank, high=INT32_MAX)
        check_number(owner, "alpha", self.alpha, "must be a number > 0", lambda v: v > 0)
        check_number(owner, "dropout", self.dropout, "must be in [0, 1)", lambda v: 0 <= v < 1)
        if isinstance(self.targets, str) or not isinstance(self.targets, tuple | list) or not self.targets:
            fail(owner, "targets", self.targets, f"must be a non-empty list of weight roles from {TARGETS}")
        for target in self.targets:
            if target not in TARGETS:
                fail(owner, "targets", self.targets, f"{target!r} is unknown; allowed: {TARGETS}")
        if len(set(self.targets)) != len(self.targets):
            fail(owner, "targets", self.targets, "names a weight role twice")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.base_quant is not None:
            if not isinstance(self.base_quant, QuantConfig):
                fail(owner, "base_quant", self.base_quant, "must be a QuantConfig or None")
            if self.base_quant.method not in BASE_QUANT_METHODS:
                fail(
                    owner,
                    "base_quant.method",
                    self.base_quant.method,
                    f"must be one of {BASE_QUANT_METHODS} (quantized on load, with no calibration data)",
                )
            if self.base_quant.include_embeddings:
                fail(owner, "base_quant.include_embeddings", True, "must be false: the embedding stays float")

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor on the adapters' output."""
        return self.alpha / self.rank

    def replace(self, **changes: Any) -> LoraConfig:
        return dataclasses.replace(self, **changes)
