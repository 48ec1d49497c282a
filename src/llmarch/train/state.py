"""The train state: what a run checkpoints and resumes from."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a run needs to continue where it stopped, besides the data iterator.

    Attributes:
      params: the model's ``nnx.Param`` variables (``nnx.split(model, nnx.Param, ...)``).
      rest: the model's other variables (e.g. the MoE expert bias, UltraMem's Tucker reference).
      opt_state: the optax optimizer state of ``params``.
      step: int32 ``[]`` the last finished step (0 before training).
      rng: uint32 ``[2]`` the run's RNG key data (``jax.random.key_data``).
      skipped: int32 ``[]`` steps skipped so far for non-finite values.
    """

    params: nnx.State
    rest: nnx.State
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    skipped: jax.Array

    # Checkpoints hold a dict with these keys, as they did before this class existed: keeping
    # the on-disk tree a dict means older checkpoints restore, and orbax never has to know it.

    def as_dict(self) -> dict[str, Any]:
        """The checkpoint layout: ``{"params", "rest", "opt_state", "step", "rng", "skipped"}``."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, tree: dict[str, Any]) -> TrainState:
        """The inverse of ``as_dict``."""
        return cls(**{field.name: tree[field.name] for field in dataclasses.fields(cls)})
