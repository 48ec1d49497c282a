"""Evaluation of a finished (or running) training run from its directory."""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from pathlib import Path

from llmarch.checks import check_positive
from llmarch.data import load_documents, load_tokenizer, pack_documents
from llmarch.run_format import CHECKPOINTS_DIR
from llmarch.train.checkpoint import CheckpointError
from llmarch.train.config import TrainConfig
from llmarch.train.run_dir import latest_verified
from llmarch.train.trainer import init_state, load_rows, make_evaluator


def _listing(run_dir) -> set[str]:
    try:
        return {p.name for p in (Path(run_dir) / CHECKPOINTS_DIR).iterdir()}
    except OSError:
        return set()


_STDERR = functools.partial(print, file=sys.stderr)


def restore_run(run_dir: str | os.PathLike, *, log=_STDERR, attempts: int = 5):
    """``(cfg, graphdef, state, step)`` of the newest verified checkpoint of a training run,
    restored on one device; see ``llmarch.train.run_dir.latest_verified`` for what is checked.

    A trainer may be saving into the run and rotating old steps away meanwhile: a failure while
    the checkpoint directory's listing changed is retried (up to ``attempts`` times); one while
    it stayed the same (a corrupted step) is raised at once.
    """
    for attempt in range(attempts):
        before = _listing(run_dir)
        try:
            cfg, ckpt, step = latest_verified(run_dir, TrainConfig.from_dict, log=log)
            try:
                graphdef, _, state = init_state(cfg, mesh=None)
                state = ckpt.restore(step, state)
            finally:
                ckpt.close()
            return cfg, graphdef, state, step
        except (CheckpointError, OSError):
            if attempt == attempts - 1 or _listing(run_dir) == before:
                raise
            time.sleep(0.2)  # the running trainer moved on: look again
    raise AssertionError("unreachable")


def evaluate_run(run_dir: str | os.PathLike, *, data: str | None = None, batches: int = 16) -> dict:
    """Loss and perplexity of the latest checkpoint in ``run_dir`` (written by ``llmarch train``)
    on the run's validation split, or on all of ``data`` when given."""
    check_positive("", batches=batches)
    cfg, graphdef, state, step = restore_run(run_dir)
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
    loss = evaluate(state.params, state.rest)
    return {
        "step": step,
        "data": data or f"validation split of {cfg.data}",
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
    }
