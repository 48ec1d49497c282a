"""Checkpoints you can trust: orbax saves of the train state (parameters, optimizer, step, RNG)
and the data iterator's position, each sealed by a manifest of checksums.

A save is complete only once ``manifest.json`` sits in its step directory: it lists every file
orbax wrote with its size and BLAKE2b digest, and carries the run's configuration. ``restore``
checks the files against it before orbax reads a byte, so a flipped bit is reported as one line
naming the step directory instead of surfacing as altered weights or a TensorStore traceback.
Rotation is ours, not orbax's: older steps are deleted only after the new step's manifest is
written, so the newest intact checkpoint is never the one removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from llmarch.checks import check_positive
from llmarch.run_format import MANIFEST, SET_ASIDE_SUFFIX
from llmarch.train.state import TrainState

_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used: unreadable, corrupted, or of another run."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` so that a reader (or a kill at any moment) sees the old file
    or the new one, never a torn mix: write a sibling, flush it to disk, then rename over."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def _files(step_dir: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(step_dir)): {"size": p.stat().st_size, "blake2b": _digest(p)}
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


class Checkpointer:
    """Saves and restores the items ``state`` and ``data`` under ``directory/<step>/``.

    Args:
      directory: the run's ``checkpoints`` directory.
      save_every: ``save`` writes at multiples of it (or when forced).
      keep: how many of the newest intact checkpoints survive rotation.
      read_only: for readers (``eval``, ``generate``): nothing is created, cleaned or deleted.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, read_only: bool = False):
        check_positive("", save_every=save_every, keep=keep)
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint path {self.directory} exists and is not a directory")
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} does not exist: the run has no checkpoint")
        self.save_every, self.keep, self.read_only = save_every, keep, read_only
        options = ocp.CheckpointManagerOptions(
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=False,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    # What is there -----------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Every finalized step, oldest first (sealed by a manifest or not)."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def is_sealed(self, step: int) -> bool:
        """Whether the save of ``step`` finished: its manifest was written after its files."""
        return (self.step_dir(step) / MANIFEST).is_file()

    def manifest(self, step: int) -> dict[str, Any]:
        path = self.step_dir(step) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} has no {MANIFEST}: its save did not finish"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} is corrupted: {path.name} is not valid JSON ({e})"
            ) from None
        if not (
            isinstance(data, dict) and data.get("format") == _FORMAT and isinstance(data.get("files"), dict)
        ):
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} is corrupted: {path.name} is not an llmarch manifest"
            )
        return data

    def verify(self, step: int) -> dict[str, Any]:
        """Checks every file of ``step`` against its manifest; returns the manifest.

        Raises:
          CheckpointError: one line naming the step directory and the first bad file.
        """
        expected = self.manifest(step)
        found = _files(self.step_dir(step))
        for name, want in expected["files"].items():
            got = found.get(name)
            if got is None:
                problem = f"{name} is missing"
            elif got != want:
                problem = f"{name} does not match its checksum"
            else:
                continue
            raise CheckpointError(f"checkpoint {self.step_dir(step)} is corrupted: {problem}")
        extra = sorted(set(found) - set(expected["files"]))
        if extra:
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} is corrupted: {extra[0]} is not in its {MANIFEST}"
            )
        return expected

    def intact(self, step: int) -> bool:
        try:
            self.verify(step)
        except CheckpointError:
            return False
        return True

    def set_aside(self, step: int, reason: str) -> Path:
        """Moves ``step`` out of the checkpoint directory (to ``<directory>_set_aside/``), kept
        for inspection but never restored or counted by rotation; returns where it went."""
        if self.read_only:
            raise CheckpointError(f"cannot set aside {self.step_dir(step)}: opened read-only")
        aside = self.directory.with_name(f"{self.directory.name}{SET_ASIDE_SUFFIX}")
        target = aside / f"{step}-{reason}-{int(time.time())}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.step_dir(step)), str(target))
        self.manager.reload()
        return target

    # Saving and restoring ------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: grain.DatasetIterator,
        *,
        config: dict | None = None,
        data: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Saves when ``step`` is due (or ``force``), seals it with a manifest that carries
        ``config`` and ``data`` (fingerprints of what the run reads), then rotates; returns
        whether it saved."""
        if self.read_only:
            raise CheckpointError(f"cannot save to {self.directory}: opened read-only")
        if not force and step % self.save_every:
            return False
        if step in self.manager.all_steps():  # e.g. a forced save at a step just saved
            return False
        if isinstance(state, TrainState):
            state = state.as_dict()  # the on-disk layout stays a dict: see TrainState
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
        )
        # Every process saves (orbax writes each one's shards and grain each one's iterator
        # state); process 0 alone seals the step. Rotation is collective too: orbax's delete waits
        # for every process (the primary deletes), so all of them call it, after the seal.
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            manifest = {
                "format": _FORMAT,
                "step": step,
                "config": config,
                "data": data,
                "files": _files(self.step_dir(step)),
            }
            atomic_write_text(self.step_dir(step) / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        for old in [s for s in self.steps() if s < step][: max(len(self.steps()) - self.keep, 0)]:
            self.manager.delete(old)
        return True

    def restore(self, step: int, target: Any, data_iterator: grain.DatasetIterator | None = None) -> Any:
        """The state saved at ``step``, verified against its manifest and laid out (shapes,
        dtypes, shardings) like ``target`` (a ``TrainState`` comes back as one);
        ``data_iterator``, when given, is moved to where it was."""
        self.verify(step)
        typed = isinstance(target, TrainState)
        if typed:  # a LoRA run's frozen base is not in its checkpoints: it stays the target's
            target, frozen = target.as_dict(), target.frozen
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target
        )
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(**items)).state
        except Exception as e:  # orbax/tensorstore errors are deep and varied: name the place
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} does not match this run's model and "
                f"optimizer ({type(e).__name__}: {first})"
            ) from e
        return TrainState.from_dict(state, frozen=frozen) if typed else state

    def close(self) -> None:
        self.manager.close()
