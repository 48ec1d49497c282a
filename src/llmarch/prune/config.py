"""``PruneConfig``: which weights a pruning zeroes, and how they are chosen."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmarch.checks import check_choice, check_int, check_number, fail

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = (None, "2:4", "4:8")
SCOPES = ("layer", "global")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Unstructured or N:M pruning of a model's linear (``Einsum``) weights.

    Attributes:
      method: ``"magnitude"`` (smallest ``|W|``), ``"wanda"`` (Sun et al. 2024: smallest
        ``|W|·‖X‖`` per output, from calibration activations) or ``"sparsegpt"`` (Frantar &
        Alistarh 2023: OBS reconstruction with the layer Hessian, as GPTQ).
      sparsity: the fraction of each weight set to zero, in [0, 1). With a ``pattern`` it must be
        the pattern's (0.5 for 2:4 and 4:8).
      pattern: None, or ``"n:m"``: at most n nonzero weights in every m consecutive input weights
        of an output (the semi-structured sparsity GPUs accelerate).
      scope: magnitude only, unstructured only: rank weights within each ``"layer"`` or across
        all of them (``"global"``).
      damp, block: SparseGPT's Hessian dampening (fraction of its mean diagonal) and lazy-batch
        width.
      include_lm_head: also prune the untied LM head.
    """

    method: str = "magnitude"
    sparsity: float = 0.5
    pattern: str | None = None
    scope: str = "layer"
    damp: float = 0.01
    block: int = 128
    include_lm_head: bool = False

    def __post_init__(self):
        owner = "PruneConfig"
        check_choice(owner, "method", self.method, METHODS)
        check_number(owner, "sparsity", self.sparsity, "must be in [0, 1)", lambda v: 0 <= v < 1)
        if self.pattern not in PATTERNS:
            fail(owner, "pattern", self.pattern, f"must be one of {PATTERNS}")
        check_choice(owner, "scope", self.scope, SCOPES)
        if self.pattern is not None:
            n, m = self.n_m
            if abs(self.sparsity - (1 - n / m)) > 1e-9:
                fail(owner, "sparsity", self.sparsity, f"must be {1 - n / m} with pattern {self.pattern!r}")
        if self.scope == "global" and (self.method != "magnitude" or self.pattern is not None):
            fail(owner, "scope", self.scope, "'global' applies to unstructured magnitude pruning only")
        check_number(owner, "damp", self.damp, "must be in [0, 1]", lambda v: 0 <= v <= 1)
        check_int(owner, "block", self.block)
        if not isinstance(self.include_lm_head, bool):
            fail(owner, "include_lm_head", self.include_lm_head, "must be true or false")

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``(n, m)`` of the pattern, or None."""
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    def replace(self, **changes: Any) -> PruneConfig:
        return dataclasses.replace(self, **changes)
