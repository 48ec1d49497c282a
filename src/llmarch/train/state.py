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
      frozen: a LoRA run's frozen base weights (``llmarch.lora.split``), with ``params`` its
        adapters; None otherwise. Never checkpointed: the base is re-read from the run's
        ``init_from`` (or rebuilt from its seed) whenever the run is read.
    """

    params: nnx.State
    rest: nnx.State
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    skipped: jax.Array
    frozen: nnx.State | None = None

    def rest_and_frozen(self) -> nnx.State:
        """What a forward pass needs besides ``params``: ``rest``, and the frozen base if any."""
        return self.rest if self.frozen is None else nnx.merge_state(self.rest, self.frozen)

    # Checkpoints hold a dict with these keys, as they did before this class existed: keeping
    # the on-disk tree a dict means older checkpoints restore, and orbax never has to know it.

    def as_dict(self) -> dict[str, Any]:
        """The checkpoint layout: ``{"params", "rest", "opt_state", "step", "rng", "skipped"}``
        (never ``frozen``)."""
        names = [field.name for field in dataclasses.fields(self) if field.name != "frozen"]
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_dict(cls, tree: dict[str, Any], frozen: nnx.State | None = None) -> TrainState:
        """The inverse of ``as_dict``, with ``frozen`` (not in a checkpoint) given apart."""
        fields = [field.name for field in dataclasses.fields(cls) if field.name != "frozen"]
        return cls(**{name: tree[name] for name in fields}, frozen=frozen)
