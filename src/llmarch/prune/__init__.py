"""Pruning: magnitude, Wanda and SparseGPT, unstructured or N:M, on every linear weight.

``prune(model, cfg, PruneConfig(method="sparsegpt", sparsity=0.5), calibration)`` returns a copy
whose linear weights hold zeros where they were pruned: an ordinary float model that ``generate``,
``eval`` and the ``Engine`` use unchanged. ``sparsity(model, cfg)`` reports what was reached.
"""

from llmarch.prune.config import PruneConfig
from llmarch.prune.masks import magnitude, n_m, sparsegpt, wanda
from llmarch.prune.model import prune, sparsity
from llmarch.prune.structured import (
    StructuredPlan,
    apply_structured,
    plan_structured,
    prune_structured,
    structured_mask,
)

__all__ = [
    "PruneConfig",
    "StructuredPlan",
    "apply_structured",
    "magnitude",
    "n_m",
    "plan_structured",
    "prune",
    "prune_structured",
    "sparsegpt",
    "sparsity",
    "structured_mask",
    "wanda",
]
