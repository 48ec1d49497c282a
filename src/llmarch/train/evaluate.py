"""A finished (or running) training run's newest verified checkpoint, restored from its directory
(``llmarch.evaluation`` evaluates it)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from flax import nnx

from llmarch.run_format import CHECKPOINTS_DIR
from llmarch.train.checkpoint import CheckpointError
from llmarch.train.config import TrainConfig
from llmarch.train.run_dir import latest_verified
from llmarch.train.trainer import init_state, with_lora_base


def _listing(run_dir) -> set[str]:
    try:
        return {p.name for p in (Path(run_dir) / CHECKPOINTS_DIR).iterdir()}
    except OSError:
        return set()


logger = logging.getLogger(__name__)


def restore_run(
    run_dir: str | os.PathLike, *, log=None, attempts: int = 5, load_base=None, seed_base: bool = False
):
    """``(cfg, graphdef, state, step)`` of the newest verified checkpoint of a training run,
    restored on one device; see ``llmarch.train.run_dir.latest_verified`` for what is checked.

    A LoRA run's checkpoints hold its adapters, not its base: ``load_base(path)`` returns the
    plain model at its ``init_from`` (``llmarch.inference.loading.load_for_inference(path)[0]``,
    which the trainer, below Hugging Face and inference, cannot call), and the state comes back
    with that base as ``state.frozen``. A LoRA run without ``init_from`` has the seed's base, as
    has any LoRA run with ``seed_base=True``, for a reader of the adapters alone (PEFT export),
    which then skips reading ``init_from``.

    A trainer may be saving into the run and rotating old steps away meanwhile: a failure while
    the checkpoint directory's listing changed is retried (up to ``attempts`` times); one while
    it stayed the same (a corrupted step) is raised at once.
    """
    for attempt in range(attempts):
        before = _listing(run_dir)
        try:
            cfg, ckpt, step = latest_verified(run_dir, TrainConfig.from_dict, log=log or logger.warning)
            try:
                graphdef, _, state = init_state(cfg, mesh=None)
                state = ckpt.restore(step, state)
            finally:
                ckpt.close()
            if not seed_base:
                state = _with_base(cfg, state, load_base, run_dir)
            return cfg, graphdef, state, step
        except (CheckpointError, OSError):
            if attempt == attempts - 1 or _listing(run_dir) == before:
                raise
            time.sleep(0.2)  # the running trainer moved on: look again
    raise AssertionError("unreachable")


def _with_base(cfg: TrainConfig, state, load_base, run_dir):
    """A LoRA run's state with its frozen base, ``init_from``'s weights (see ``restore_run``)."""
    if cfg.lora is None or cfg.init_from is None:
        return state
    if load_base is None:
        raise ValueError(
            f"{run_dir} is a LoRA run whose base is {cfg.init_from}: read it with "
            "llmarch.inference.loading.load_for_inference (or pass restore_run a load_base)"
        )
    _, params, rest = nnx.split(load_base(cfg.init_from), nnx.Param, ...)
    return with_lora_base(cfg, state, params, rest, fresh=False)
