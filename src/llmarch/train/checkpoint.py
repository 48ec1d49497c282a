"""Checkpoints with orbax: the train state (parameters, optimizer, step, RNG) and the data
iterator's state saved together every N steps, the last K kept, the latest restored."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint directory that exists but cannot be read as one."""


class Checkpointer:
    """An orbax ``CheckpointManager`` over ``directory`` with two items: ``state`` and ``data``."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int):
        for name, value in (("save_every", save_every), ("keep", keep)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint path {self.directory} exists and is not a directory")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, *,
             force: bool = False) -> bool:
        """Saves when ``step`` is due (or ``force``); returns whether it saved."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, target: Any, data_iterator: grain.DatasetIterator | None = None) -> Any:
        """The state saved at ``step``, laid out (shapes, dtypes, shardings) like ``target``;
        ``data_iterator``, when given, is moved to where it was."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        args = ocp.args.Composite(**items)
        try:
            return self.manager.restore(step, args=args).state
        except Exception as e:  # orbax/tensorstore errors are deep and varied: name the place
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} is unreadable or does not match this "
                f"run's model and optimizer ({type(e).__name__}: {e}); delete it or choose another "
                "output directory") from e

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
