"""Loading a model to serve: an llmarch training run directory or a Hugging Face checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flax import nnx

from llmarch import hf
from llmarch.config import ModelConfig
from llmarch.data.tokenizer import TOKENIZER_FILE, load_tokenizer


def _hf_tokenizer(root: Path):
    """The checkpoint's ``tokenizer.json``, special tokens named by ``tokenizer_config.json``."""
    names: dict[str, str] = {}
    config = root / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        for field in ("bos_token", "eos_token", "pad_token"):
            value = data.get(field)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[field] = value
    names.setdefault("pad_token", names.get("eos_token", "<pad>"))
    try:
        return load_tokenizer(root, **names)
    except (ValueError, KeyError) as e:
        raise ValueError(f"the tokenizer in {root} cannot be loaded ({e}); pass a tokenizer "
                         "explicitly, or token ids instead of text") from None


def load_for_inference(path: str | os.PathLike, *, dtype: Any = None) -> tuple[nnx.Module, ModelConfig, Any]:
    """``(model, cfg, tokenizer or None)`` from a checkpoint directory.

    ``path`` is either a run directory written by ``llmarch train`` (its latest checkpoint and
    its tokenizer) or a Hugging Face checkpoint (``config.json`` + safetensors; its
    ``tokenizer.json`` when present). ``dtype`` applies to Hugging Face checkpoints.

    Raises:
      FileNotFoundError: no such directory, or neither kind of checkpoint in it.
    """
    from llmarch.train.trainer import CONFIG_FILE

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(root)!r} does not exist")
    if (root / CONFIG_FILE).is_file():
        return _load_run(root)
    if (root / hf.CONFIG_FILE).is_file():
        model, cfg = hf.load_pretrained(root, dtype=dtype)
        tokenizer = _hf_tokenizer(root) if (root / TOKENIZER_FILE).is_file() else None
        return model, cfg, tokenizer
    raise FileNotFoundError(f"{root} holds neither an llmarch run ({CONFIG_FILE}) nor a Hugging Face "
                            f"checkpoint ({hf.CONFIG_FILE} + safetensors)")


def _load_run(root: Path):
    """The latest checkpoint of an ``llmarch train`` run, restored as ``evaluate_run`` does."""
    from llmarch.train.checkpoint import Checkpointer, CheckpointError
    from llmarch.train.trainer import CONFIG_FILE, TrainConfig, init_state

    cfg = TrainConfig.from_dict(json.loads((root / CONFIG_FILE).read_text()))
    ckpt = Checkpointer(root / "checkpoints", save_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)
    step = ckpt.latest_step()
    if step is None:
        ckpt.close()
        raise CheckpointError(f"{root / 'checkpoints'} holds no checkpoint to generate from")
    graphdef, _, state = init_state(cfg, mesh=None)
    state = ckpt.restore(step, state)
    ckpt.close()
    model = nnx.merge(graphdef, state["params"], state["rest"])
    return model, model.cfg, load_tokenizer(cfg.tokenizer)
