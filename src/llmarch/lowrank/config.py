"""``LowRankConfig``: which linear weights a low-rank factorization replaces, and at what rank."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmarch.checks import check_choice, check_number, fail

SCALINGS = ("whiten", "asvd")


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
    """Truncated-SVD factorization ``W [K, N] ≈ A [K, r] · B [r, N]`` of a model's linear weights.

    Exactly one of ``param_ratio`` and ``energy`` chooses each weight's rank.

    Attributes:
      param_ratio: the fraction of a weight's parameters its factors may hold: the largest r with
        ``r·(K+N) ≤ param_ratio·K·N``; in (0, 1] (1 is the break-even rank ``K·N/(K+N)``).
      energy: the fraction of the squared singular values ``Σσ²`` kept: the smallest r reaching
        it, per layer; in (0, 1] (1 keeps every nonzero one: the weight reproduced exactly). With
        ``activation_aware`` it is the energy of the whitened (output) spectrum.
      activation_aware: take the SVD in the metric of calibration activations instead of the
        weights' own (needs ``calibration`` rows): ``scaling="whiten"`` is SVD-LLM's Cholesky
        whitening by ``XᵀX``; ``"asvd"`` is ASVD's diagonal scaling by ``mean|x|^asvd_alpha``.
      damp: SVD-LLM: ``XᵀX`` is dampened by ``damp·mean(diag)·I`` before Cholesky, in [0, 1].
      asvd_alpha: ASVD's exponent α, in (0, 1].
      include_lm_head: also factorize the untied LM head.
      only_if_smaller: leave dense a weight whose factors (at the stored rank) would hold at least
        as many parameters as it does; False factorizes it anyway (e.g. to check a full-rank SVD).
    """

    param_ratio: float | None = None
    energy: float | None = None
    activation_aware: bool = False
    scaling: str = "whiten"
    damp: float = 0.01
    asvd_alpha: float = 0.5
    include_lm_head: bool = False
    only_if_smaller: bool = True

    def __post_init__(self):
        owner = "LowRankConfig"
        if (self.param_ratio is None) == (self.energy is None):
            fail(
                owner,
                "param_ratio",
                self.param_ratio,
                f"give exactly one of param_ratio and energy (energy={self.energy!r})",
            )
        in_unit = lambda v: 0 < v <= 1  # noqa: E731
        if self.param_ratio is not None:
            check_number(owner, "param_ratio", self.param_ratio, "must be in (0, 1]", in_unit)
        if self.energy is not None:
            check_number(owner, "energy", self.energy, "must be in (0, 1]", in_unit)
        for name in ("activation_aware", "include_lm_head", "only_if_smaller"):
            if not isinstance(getattr(self, name), bool):
                fail(owner, name, getattr(self, name), "must be true or false")
        check_choice(owner, "scaling", self.scaling, SCALINGS)
        check_number(owner, "damp", self.damp, "must be in [0, 1]", lambda v: 0 <= v <= 1)
        check_number(owner, "asvd_alpha", self.asvd_alpha, "must be in (0, 1]", in_unit)

    @property
    def method(self) -> str:
        """The name of the method, for errors and progress bars."""
        if not self.activation_aware:
            return "svd"
        return "svd-llm" if self.scaling == "whiten" else "asvd"

    def replace(self, **changes: Any) -> LowRankConfig:
        return dataclasses.replace(self, **changes)
