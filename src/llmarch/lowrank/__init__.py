"""Low-rank factorization: linear weights ``W [K, N]`` replaced by ``A [K, r] · B [r, N]``.

``factorize_model(model, cfg, LowRankConfig(param_ratio=0.5))`` returns a copy whose linear
weights are ``LowRankEinsum`` factors from their truncated SVD (rank by a parameter budget or by
retained energy; with ``activation_aware=True``, SVD-LLM's whitening by calibration activations,
or ASVD's scaling) and the config that records them (``ModelConfig.low_rank``): the factorized
model trains, checkpoints, evaluates and generates as any other, and ``llmarch.accounting`` counts
its smaller parameters and FLOPs.
"""

from llmarch.lowrank.config import LowRankConfig
from llmarch.lowrank.layer import LowRankEinsum
from llmarch.lowrank.model import Plan, factorize_model, plan
from llmarch.lowrank.svd import (
    Decomposition,
    asvd_scaling,
    decompose,
    factorize,
    rank_for_energy,
    rank_for_params,
    whitening_from_hessian,
)

__all__ = [
    "Decomposition",
    "LowRankConfig",
    "LowRankEinsum",
    "Plan",
    "asvd_scaling",
    "decompose",
    "factorize",
    "factorize_model",
    "plan",
    "rank_for_energy",
    "rank_for_params",
    "whitening_from_hessian",
]
