"""Checkpoints as the start of new work: fine-tuning from one, distilling from one, and writing a
transformed model (pruned, factorized) back as an ordinary run directory.

A *source* is an ``llmarch train`` run directory (including one this module wrote) or a Hugging
Face checkpoint directory. The trainer (``llmarch.train``) sits below the Hugging Face and
inference packages, so this module does what it cannot: ``train(cfg)`` reads ``cfg.init_from``
and ``cfg.distill.teacher``, checks that tokenizers and vocabularies agree, and hands the trainer
the loaded weights, the teacher and a sampler for on-policy distillation. ``write_run`` makes a run
directory whose single checkpoint (step 0) holds a given model, so ``eval``, ``generate``, the
``Engine``, ``quantize`` and a recovery ``llmarch train --out DIR`` use it unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from llmarch import hf, hub
from llmarch.checks import check_positive
from llmarch.config import ModelConfig
from llmarch.data import make_batches
from llmarch.data.tokenizer import TOKENIZER_FILE
from llmarch.json_config import read_json
from llmarch.quant.checkpoint import is_quantized_checkpoint
from llmarch.run_format import CHECKPOINTS_DIR, CONFIG_FILE, existing_dir, is_run
from llmarch.train import run_dir
from llmarch.train.checkpoint import Checkpointer, atomic_write_text
from llmarch.train.config import TrainConfig
from llmarch.train.trainer import TrainResult, init_state, load_rows, start_from
from llmarch.train.trainer import train as _train

DERIVED_FILE = "derived.json"  # in a written run: where its weights came from and how
_HF_SEQ_LEN = 512  # calibration rows of a checkpoint with no training run behind it
_EXPECTED = f"an llmarch run directory ({CONFIG_FILE}) or a Hugging Face checkpoint ({hf.CONFIG_FILE})"


@dataclasses.dataclass(frozen=True)
class Source:
    """What a checkpoint directory holds, read without loading its weights.

    Attributes:
      root: the directory.
      cfg: its model's config.
      tokenizer: its tokenizer spec ("byte" or a tokenizer.json path), or None if it has none.
      train: the run's TrainConfig as a dict, or None for a Hugging Face checkpoint.
    """

    root: Path
    cfg: ModelConfig
    tokenizer: str | None
    train: dict[str, Any] | None

    def load(self) -> nnx.Module:
        """The model with its weights (``llmarch.inference.loading.load_for_inference``)."""
        from llmarch.inference.loading import load_for_inference

        return load_for_inference(self.root)[0]


def source(path: str | os.PathLike, *, what: str = "checkpoint") -> Source:
    """The ``Source`` at ``path`` (or at the Hub id ``org/name``: ``llmarch.hub``); ``what`` names it
    in errors (e.g. "TrainConfig.init_from").

    Raises:
      FileNotFoundError, ValueError: not a directory, neither kind of checkpoint, a quantized one.
    """
    root = existing_dir(hub.resolve(path, what=what), _EXPECTED, what=what).resolve()
    if is_quantized_checkpoint(root):
        raise ValueError(f"{what} {root} is quantized: start from its float source instead")
    if is_run(root):
        from llmarch.train.run_dir import latest_verified

        cfg, ckpt, _ = latest_verified(root, TrainConfig.from_dict)
        ckpt.close()
        return Source(root, cfg.model_config(), cfg.tokenizer, run_dir.as_dict(cfg))
    if (root / hf.CONFIG_FILE).is_file():
        cfg = hf.config_from_hf(read_json(root / hf.CONFIG_FILE))
        file = root / TOKENIZER_FILE
        return Source(root, cfg, str(file) if file.is_file() else None, None)
    raise FileNotFoundError(f"{what} {root} is not a checkpoint: expected {_EXPECTED}")


def same_tokenizer(a: str | None, b: str | None) -> bool:
    """Whether two tokenizer specs name the same tokenizer: both "byte", or tokenizer.json files
    whose vocabularies and merges (their ``model`` sections) are equal."""
    if a is None or b is None or (a == "byte") != (b == "byte"):
        return False
    if a == "byte":
        return True

    def model_of(spec: str) -> Any:
        path = Path(spec)
        return read_json(path / TOKENIZER_FILE if path.is_dir() else path).get("model")

    return model_of(a) == model_of(b)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with what its ``init_from`` implies filled in (the model config, ``keep_sparsity``),
    checked against the source and the teacher.

    Raises:
      ValueError: a model or tokenizer that differs from ``init_from``'s, or a teacher whose
        tokenizer or vocabulary is not the student's.
    """
    if cfg.init_from is not None:
        src = source(cfg.init_from, what="TrainConfig.init_from")
        if cfg.model is not None and cfg.model != src.cfg:
            raise ValueError(
                f"TrainConfig.model differs from the model of init_from={cfg.init_from!r}: leave it out "
                "(the source's is used)"
            )
        if not same_tokenizer(cfg.tokenizer, src.tokenizer):
            raise ValueError(
                f"TrainConfig.tokenizer={cfg.tokenizer!r} is not the tokenizer of init_from="
                f"{cfg.init_from!r} ({src.tokenizer}): train with the tokenizer the weights were trained "
                f"with, tokenizer={src.tokenizer or 'byte'!r} (llmarch train --init-from picks it itself)"
            )
        keep = cfg.keep_sparsity
        if keep is None:  # a LoRA run's merged weights are dense: it keeps no sparsity
            keep = cfg.lora is None and bool((src.train or {}).get("keep_sparsity"))
        cfg = dataclasses.replace(cfg, model=src.cfg, init_from=str(src.root), keep_sparsity=keep)
    if cfg.distill is not None:
        teacher = source(cfg.distill.teacher, what="DistillConfig.teacher")
        student = cfg.model_config()
        if teacher.cfg.vocab_size != student.vocab_size:
            raise ValueError(
                f"DistillConfig.teacher {teacher.root} has vocab_size={teacher.cfg.vocab_size}, the "
                f"student {student.vocab_size}: teacher and student must share a vocabulary"
            )
        if not same_tokenizer(cfg.tokenizer, teacher.tokenizer):
            raise ValueError(
                f"DistillConfig.teacher {teacher.root} uses tokenizer {teacher.tokenizer}, the student "
                f"{cfg.tokenizer!r}: teacher and student must share a tokenizer"
            )
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=str(teacher.root)))
    return cfg


def train(cfg: TrainConfig, *, log=None) -> TrainResult:
    """``llmarch.train.trainer.train`` for any ``TrainConfig``, ``init_from`` and ``distill``
    included: loads what they name and checks it (see ``resolve``)."""
    cfg = resolve(cfg)
    init = teacher = sampler = None
    if cfg.init_from is not None:

        def init():
            model = source(cfg.init_from).load()
            _, params, rest = nnx.split(model, nnx.Param, ...)
            return params, rest

    if cfg.distill is not None:
        teacher = source(cfg.distill.teacher).load()
        if cfg.distill.on_policy_fraction > 0:
            from llmarch.inference.generate import generate

            def sampler(model, prompt, new_tokens, seed):
                return generate(model, prompt, new_tokens, temperature=1.0, seed=seed)

    return _train(cfg, log=log, init=init, teacher=teacher, sampler=sampler)


def calibration(src: Source, data: str | None, samples: int, *, what: str) -> np.ndarray:
    """int32 ``[samples, seq_len]`` calibration rows of ``data`` (default: the source run's corpus),
    at the run's sequence length (a Hugging Face source: up to 512 tokens); ``what`` names the
    method in errors.

    Raises:
      ValueError: no data to calibrate on, no tokenizer to read it with, or too little of it.
    """
    from llmarch.data import load_tokenizer
    from llmarch.quant.convert import calibration_rows

    check_positive("", calibration_samples=samples)
    data = data or (src.train or {}).get("data")
    if data is None:
        raise ValueError(f"{what} needs --calibration-data FILE (a text corpus)")
    if src.tokenizer is None:
        raise ValueError(f"{src.root} has no tokenizer to read --calibration-data {data} with")
    seq_len = src.train["seq_len"] if src.train else min(src.cfg.max_seq_len, _HF_SEQ_LEN)
    return calibration_rows(data, load_tokenizer(src.tokenizer), seq_len, samples, src.cfg.vocab_size)


def check_out(out: str | os.PathLike) -> Path:
    """``out`` as a path, if it may become a new run: absent or an empty directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory")
    return out


def write_run(
    model: nnx.Module,
    out: str | os.PathLike,
    *,
    src: Source,
    how: dict[str, Any],
    keep_sparsity: bool = False,
    report: dict[str, Any] | None = None,
) -> Path:
    """Writes ``model`` as a run directory ``out`` holding one checkpoint, step 0.

    The run's settings are the source run's (its data, sequence length and optimizer, so
    ``llmarch train --out OUT --steps N`` is a recovery fine-tune with the original recipe), or the
    defaults on the default corpus for a Hugging Face source, with the model config
    ``model.cfg`` and the source's tokenizer. ``derived.json`` records the source, ``how`` the
    weights were made, and ``report`` (e.g. the sparsity reached per layer).

    Raises:
      ValueError: ``out`` exists and is not an empty directory.
    """
    out = check_out(out)
    base = dict(src.train or {})
    for name in ("model", "preset", "init_from", "distill", "resume", "keep_sparsity", "lora"):
        base.pop(name, None)
    base.update(
        out_dir=str(out.resolve()),
        model=json.loads(model.cfg.to_json()),
        tokenizer=src.tokenizer or "byte",
        keep_sparsity=keep_sparsity,
    )
    cfg = TrainConfig.from_dict(base)
    rows = load_rows(cfg)  # before anything is written: bad data leaves nothing behind
    graphdef, tx, state = init_state(cfg, mesh=None)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = start_from(state, tx, params, rest)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(out / CHECKPOINTS_DIR, save_every=1, keep=1)
    try:
        iterator = make_batches(rows[0], batch_size=cfg.batch_size, seed=cfg.seed)
        ckpt.save(0, state, iterator, config=run_dir.as_dict(cfg), force=True)
    finally:
        ckpt.close()
    atomic_write_text(out / CONFIG_FILE, cfg.to_json() + "\n")
    record = {"source": str(src.root), "how": how, "report": report}
    atomic_write_text(out / DERIVED_FILE, json.dumps(record, indent=2, default=_plain) + "\n")
    return out


def _plain(value: Any) -> Any:
    """numpy scalars in a report, as JSON numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")
