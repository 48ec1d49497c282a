"""Evaluation of a finished (or running) training run from its directory."""

from __future__ import annotations

import math
import os

from llmarch.data import load_documents, load_tokenizer, pack_documents
from llmarch.train.run_dir import latest_verified
from llmarch.train.trainer import TrainConfig, init_state, load_rows, make_evaluator


def restore_run(run_dir: str | os.PathLike, *, log=lambda s: None):
    """``(cfg, graphdef, state, step)`` of the newest verified checkpoint of a training run,
    restored on one device; see ``llmarch.train.run_dir.latest_verified`` for what is checked."""
    cfg, ckpt, step = latest_verified(run_dir, TrainConfig.from_dict, log=log)
    try:
        graphdef, _, state = init_state(cfg, mesh=None)
        state = ckpt.restore(step, state)
    finally:
        ckpt.close()
    return cfg, graphdef, state, step


def evaluate_run(run_dir: str | os.PathLike, *, data: str | None = None, batches: int = 16) -> dict:
    """Loss and perplexity of the latest checkpoint in ``run_dir`` (written by ``llmarch train``)
    on the run's validation split, or on all of ``data`` when given."""
    if isinstance(batches, bool) or not isinstance(batches, int) or batches <= 0:
        raise ValueError(f"batches={batches!r} is invalid: must be a positive integer")
    cfg, graphdef, state, step = restore_run(run_dir)
    if data is None:
        rows = load_rows(cfg)[1]
    else:
        rows = pack_documents(load_documents(data, text_field=cfg.text_field), load_tokenizer(cfg.tokenizer),
                              seq_len=cfg.seq_len, model_vocab_size=cfg.model_config().vocab_size)
    evaluate = make_evaluator(graphdef, rows, batch_size=cfg.batch_size, batches=batches)
    loss = evaluate(state["params"], state["rest"])
    return {"step": step, "data": data or f"validation split of {cfg.data}", "loss": loss,
            "perplexity": math.exp(min(loss, 50.0))}
