"""A training run's directory: who may write it, which checkpoint to start from, and how
readers (``eval``, ``generate``) find a verified checkpoint in it. Its layout and file names
are ``llmarch.run_format``'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import filelock
import jax

from llmarch.json_config import json_kind, read_json
from llmarch.run_format import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LOCK_FILE,
    MANIFEST,
    existing_dir,
)
from llmarch.train import distributed
from llmarch.train.checkpoint import Checkpointer, CheckpointError

RESUME_MODES = ("auto", "must", "never", "fallback")
# Fields that may change between a run and its resumption: they steer the loop, not the state.
RESUMABLE_CHANGES = frozenset(
    {
        "out_dir",
        "steps",
        "eval_every",
        "eval_batches",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "tensorboard",
        "progress",
        "peak_flops",
        "nan_policy",
        "mesh",
        "rules",
        "resume",
        "max_skipped_fraction",
        "loss_chunk",  # how the loss is computed, not what it is
        "profile_steps",  # what is traced, not what is trained
        "wandb",  # where metrics also go
    }
)


def lock(out_dir: Path) -> filelock.BaseFileLock:
    """Takes the run's writer lock, or raises naming the directory. The OS releases it when the
    process dies (``kill -9`` included), so a stale lock never blocks a restart."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = filelock.FileLock(out_dir / LOCK_FILE)
    try:
        handle.acquire(timeout=0)
    except filelock.Timeout:
        raise RuntimeError(
            f"another process is training in {out_dir} (it holds {out_dir / LOCK_FILE}); "
            "wait for it to finish or stop it, or choose another --out"
        ) from None
    return handle


def config_diff(old: dict, new: dict) -> list[str]:
    """The fields (dotted paths) whose values differ and that a resumed run may not change."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_CHANGES:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in config_diff(a, b)]
        elif a != b:
            out.append(f"{key}: {json.dumps(a)} in the checkpoint, {json.dumps(b)} now")
    return out


def start_step(ckpt: Checkpointer, mode: str, config: dict, data: dict | None = None, *, log) -> int | None:
    """The checkpoint to resume from under ``mode`` (None: a fresh start), verified; see
    ``_start_step``. In a multi-process run process 0 decides alone (it may set checkpoints aside)
    and tells the others, which then see the directory as it left it."""
    if jax.process_count() == 1:
        return _start_step(ckpt, mode, config, data, log=log)
    error, step = None, None
    if jax.process_index() == 0:
        try:
            step = _start_step(ckpt, mode, config, data, log=log)
        except Exception as e:  # noqa: BLE001 (raised below, once the others know)
            error = e
    agreed = distributed.from_main(-2 if error is not None else -1 if step is None else step)
    if error is not None:
        raise error
    if agreed == -2:
        raise CheckpointError(f"process 0 cannot resume from {ckpt.directory} (it says why)")
    ckpt.manager.reload()
    return None if agreed == -1 else agreed


def _start_step(ckpt: Checkpointer, mode: str, config: dict, data: dict | None = None, *, log) -> int | None:
    """The checkpoint to resume from under ``mode`` (None: a fresh start), verified.

    ``auto`` resumes from the newest checkpoint and fails if it is corrupted; ``must`` also
    fails when there is none; ``never`` fails when there is one; ``fallback`` sets corrupted
    checkpoints aside (to ``checkpoints_set_aside/``) and resumes from the newest intact one.
    A newest step without a manifest is a save that a kill interrupted: it is set aside in
    every mode, since its files may be incomplete. ``data`` (fingerprints of the token streams)
    must match what the checkpoint was trained on.
    """
    steps = ckpt.steps()
    if steps and not ckpt.is_sealed(steps[-1]):
        where = ckpt.set_aside(steps[-1], "unfinished")
        log(f"checkpoint {steps[-1]} was still being saved when the last run stopped: moved to {where}")
        steps = steps[:-1]
    if mode == "never" and steps:
        raise CheckpointError(
            f"{ckpt.directory} already holds checkpoints {steps} and --resume never was "
            "given; choose another --out, or --resume auto to continue the run"
        )
    if mode == "must" and not steps:
        raise CheckpointError(f"{ckpt.directory} holds no checkpoint to resume from (--resume must)")
    corrupted = 0
    while steps:
        step = steps[-1]
        try:
            manifest = ckpt.verify(step)
        except CheckpointError as e:
            if mode != "fallback":
                raise CheckpointError(
                    f"{e}; rerun with --resume fallback to set it aside and resume from "
                    "the newest intact checkpoint"
                ) from None
            log(f"{e}: moved to {ckpt.set_aside(step, 'corrupted')}")
            steps, corrupted = steps[:-1], corrupted + 1
            continue
        differ = config_diff(manifest.get("config") or {}, config)
        if data is not None and manifest.get("data") not in (None, data):
            differ.append("the training or validation tokens (the corpus or tokenizer changed)")
        if differ:
            raise CheckpointError(
                f"{ckpt.step_dir(step)} was saved by a run with another configuration "
                f"({'; '.join(differ)}); nothing was changed: use the same settings "
                "to resume, or another --out for a new run"
            )
        return step
    if corrupted:  # fallback found nothing intact: starting over is not what was asked
        raise CheckpointError(
            f"every checkpoint in {ckpt.directory} was corrupted ({corrupted} set aside in "
            f"{ckpt.directory.name}_set_aside/); nothing is left to resume from: rerun to "
            "start this run from scratch, or use another --out"
        )
    if mode == "must":
        raise CheckpointError(f"{ckpt.directory} holds no intact checkpoint to resume from (--resume must)")
    return None


def latest_verified(root: str | os.PathLike, parse, *, log=lambda s: None) -> tuple[Any, Checkpointer, int]:
    """For readers: ``(config, read-only checkpointer, step)`` of the newest sealed and verified
    checkpoint of the run in ``root``; ``parse`` turns the stored config dict into the config
    (e.g. ``TrainConfig.from_dict``), and runs first, on ``train_config.json``, so that a bad
    file is named before anything else is looked at.

    Raises:
      FileNotFoundError: ``root`` does not exist or is not a directory.
      ValueError: ``train_config.json`` is not valid JSON or not a valid configuration.
      CheckpointError: not a run, no checkpoint, or the newest one is corrupted.
    """
    root = existing_dir(Path(root).absolute(), "the run directory of `llmarch train`", what="run")
    path = root / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{root} is not a training run: it has no {CONFIG_FILE}")

    def parsed(data: Any, where: Path) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"{where} must hold a JSON object, not {json_kind(data)}")
        try:
            return parse(data)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    config = parsed(read_json(path), path)
    if not (root / CHECKPOINTS_DIR).is_dir():
        raise CheckpointError(f"{root / CHECKPOINTS_DIR} holds no checkpoint")
    ckpt = Checkpointer(root / CHECKPOINTS_DIR, save_every=1, keep=1, read_only=True)
    steps = ckpt.steps()
    if steps and not ckpt.is_sealed(steps[-1]):  # being saved right now, or cut short by a kill
        log(f"skipping checkpoint {steps[-1]}: its save has not finished")
        steps = steps[:-1]
    if not steps:
        ckpt.close()
        raise CheckpointError(f"{root / CHECKPOINTS_DIR} holds no checkpoint")
    try:
        saved = ckpt.verify(steps[-1]).get("config")
        if saved is not None:  # the configuration the checkpoint was saved under
            config = parsed(saved, ckpt.step_dir(steps[-1]) / MANIFEST)
    except Exception:
        ckpt.close()
        raise
    return config, ckpt, steps[-1]


def as_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
