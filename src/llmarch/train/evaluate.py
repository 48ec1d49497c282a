"""Evaluation of a finished (or running) training run from its directory."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from flax import nnx

from llmarch.checks import check_positive
from llmarch.data import load_documents, load_tokenizer, pack_documents
from llmarch.run_format import CHECKPOINTS_DIR
from llmarch.train.checkpoint import CheckpointError
from llmarch.train.config import TrainConfig
from llmarch.train.run_dir import latest_verified
from llmarch.train.trainer import init_state, load_rows, make_evaluator, with_lora_base


def _listing(run_dir) -> set[str]:
    try:
        return {p.name for p in (Path(run_dir) / CHECKPOINTS_DIR).iterdir()}
    except OSError:
        return set()


logger = logging.getLogger(__name__)


def restore_run(run_dir: str | os.PathLike, *, log=None, attempts: int = 5, load_base=None):
    """``(cfg, graphdef, state, step)`` of the newest verified checkpoint of a training run,
    restored on one device; see ``llmarch.train.run_dir.latest_verified`` for what is checked.

    A LoRA run's checkpoints hold its adapters, not its base: ``load_base(path)`` returns the
    plain model at its ``init_from`` (``llmarch.inference.loading.load_for_inference(path)[0]``,
    which the trainer, below Hugging Face and inference, cannot call), and the state comes back
    with that base as ``state.frozen``. A LoRA run without ``init_from`` has the seed's base.

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
            return cfg, graphdef, _with_base(cfg, state, load_base, run_dir), step
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


def evaluate_run(
    run_dir: str | os.PathLike, *, data: str | None = None, batches: int = 16, load_base=None
) -> dict:
    """Loss and perplexity of the latest checkpoint in ``run_dir`` (written by ``llmarch train``)
    on the run's validation split, or on all of ``data`` when given; ``load_base``: see
    ``restore_run``."""
    check_positive("", batches=batches)
    cfg, graphdef, state, step = restore_run(run_dir, load_base=load_base)
    if data is None:
        rows = load_rows(cfg)[1]
    else:
        rows = pack_documents(
            load_documents(data, text_field=cfg.text_field),
            load_tokenizer(cfg.tokenizer),
            seq_len=cfg.seq_len,
            model_vocab_size=cfg.model_config().vocab_size,
        )
    evaluate = make_evaluator(
        graphdef, rows, batch_size=cfg.batch_size, batches=batches, loss_chunk=cfg.loss_chunk
    )
    loss = evaluate(state.params, state.rest_and_frozen())
    return {
        "step": step,
        "data": data or f"validation split of {cfg.data}",
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
    }
