"""Evaluation of a finished (or running) training run from its directory."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from llmarch.data import load_documents, load_tokenizer, pack_documents
from llmarch.train.checkpoint import Checkpointer, CheckpointError
from llmarch.train.trainer import CONFIG_FILE, TrainConfig, init_state, load_rows, make_evaluator


def evaluate_run(run_dir: str | os.PathLike, *, data: str | None = None, batches: int = 16) -> dict:
    """Loss and perplexity of the latest checkpoint in ``run_dir`` (written by ``llmarch train``)
    on the run's validation split, or on all of ``data`` when given."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {str(root)!r} does not exist")
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{root} is not a training run: it has no {CONFIG_FILE}")
    cfg = TrainConfig.from_dict(json.loads(config_path.read_text()))
    ckpt = Checkpointer(root / "checkpoints", save_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)
    step = ckpt.latest_step()
    if step is None:
        raise CheckpointError(f"{root / 'checkpoints'} holds no checkpoint to evaluate")
    graphdef, _, state = init_state(cfg, mesh=None)
    state = ckpt.restore(step, state)
    ckpt.close()
    if data is None:
        rows = load_rows(cfg)[1]
    else:
        rows = pack_documents(load_documents(data, text_field=cfg.text_field), load_tokenizer(cfg.tokenizer),
                              seq_len=cfg.seq_len, model_vocab_size=cfg.model_config().vocab_size)
    evaluate = make_evaluator(graphdef, rows, batch_size=cfg.batch_size, batches=batches)
    loss = evaluate(state["params"], state["rest"])
    return {"step": step, "data": data or f"validation split of {cfg.data}", "loss": loss,
            "perplexity": math.exp(min(loss, 50.0))}
