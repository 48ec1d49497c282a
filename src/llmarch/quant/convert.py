"""Checkpoint to quantized checkpoint (``llmarch quantize``), and evaluating one (``llmarch eval``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from llmarch import hf, hub
from llmarch.checks import check_positive
from llmarch.data import load_documents, pack_documents
from llmarch.data.tokenizer import TOKENIZER_FILE
from llmarch.json_config import read_json
from llmarch.quant.checkpoint import (
    checkpoint_bytes,
    is_quantized_checkpoint,
    read_record,
    save_quantized,
)
from llmarch.quant.config import QuantConfig
from llmarch.quant.model import quantize
from llmarch.run_format import CONFIG_FILE, existing_dir, is_run

CALIBRATED = ("gptq", "awq")
_HF_SEQ_LEN, _HF_BATCH = 512, 8  # evaluation rows of a checkpoint with no training run behind it


def quantize_checkpoint(
    src: str | os.PathLike,
    qcfg: QuantConfig,
    out: str | os.PathLike,
    *,
    calibration_data: str | None = None,
    calibration_samples: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantizes the float checkpoint ``src`` (an ``llmarch train`` run or a Hugging Face
    directory) and writes the result to ``out``; returns a summary (sizes, seconds).

    GPTQ and AWQ calibrate on the first ``calibration_samples`` rows of ``calibration_data``
    (default: a run's own training data), packed to the run's sequence length.

    Raises:
      ValueError: an already quantized ``src``, an ``out`` holding files, calibration data asked
        for a method without calibration, missing or too short.
    """
    from llmarch.inference.loading import load_for_inference

    check_positive("", calibration_samples=calibration_samples)
    root = existing_dir(hub.resolve(src), f"an llmarch run ({CONFIG_FILE}) or {hf.HF_CHECKPOINT}")
    if is_quantized_checkpoint(root):
        _, _, done = read_record(root)
        raise ValueError(
            f"{root} is already quantized ({done.method}, {done.bits} bits): "
            "quantize its float source instead"
        )
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory")
    if qcfg.method not in CALIBRATED and calibration_data is not None:
        raise ValueError(f"--calibration-data applies to {CALIBRATED} only, not method={qcfg.method!r}")
    train = read_json(root / CONFIG_FILE) if is_run(root) else None
    if train is not None:
        tokenizer_spec = train["tokenizer"]
    else:
        tokenizer_spec = str(root / TOKENIZER_FILE) if (root / TOKENIZER_FILE).is_file() else None
    model, cfg, tokenizer = load_for_inference(root)
    start = time.perf_counter()
    calibration = None
    if qcfg.method in CALIBRATED:
        data = calibration_data or (train or {}).get("data")
        if data is None:
            raise ValueError(f"--method {qcfg.method} needs --calibration-data FILE (a text corpus)")
        if tokenizer is None:
            raise ValueError(f"{root} has no tokenizer to read --calibration-data {data} with")
        seq_len = train["seq_len"] if train else min(cfg.max_seq_len, _HF_SEQ_LEN)
        calibration = calibration_rows(data, tokenizer, seq_len, calibration_samples, cfg.vocab_size)
    qmodel = quantize(model, cfg, qcfg, calibration, progress=progress)
    seconds = time.perf_counter() - start
    save_quantized(qmodel, cfg, out, tokenizer=tokenizer_spec, source=str(root.resolve()), train=train)
    float_bytes = sum(np.asarray(v.get_value()).nbytes for _, v in nnx.to_flat_state(nnx.state(model)))
    return {
        "source": str(root),
        "out": str(out),
        "method": qcfg.method,
        "bits": qcfg.bits if qcfg.method != "fp8" else 8,
        "group_size": qcfg.group_size if qcfg.method != "fp8" else qcfg.fp8_block,
        "seconds": round(seconds, 2),
        "bytes": checkpoint_bytes(out),
        "float32_bytes": float_bytes,
    }


def calibration_rows(data: str, tokenizer, seq_len: int, samples: int, vocab_size: int) -> np.ndarray:
    """int32 ``[samples, seq_len]``: the first ``samples`` full rows of the corpus ``data``.

    Raises:
      ValueError: when the corpus holds fewer than ``samples`` full rows.
    """
    try:
        rows = pack_documents(load_documents(data), tokenizer, seq_len=seq_len, model_vocab_size=vocab_size)
    except ValueError as e:
        raise ValueError(f"calibration data {data} is too short: {e}") from None
    full = (rows.num_tokens - 1) // seq_len
    if full < samples:
        raise ValueError(
            f"calibration data {data} is too short: {full} sequences of {seq_len} tokens, "
            f"--calibration-samples {samples} needs {samples * seq_len + 1} tokens"
        )
    return np.stack([rows[i]["inputs"] for i in range(samples)])


def evaluate_quantized(path: str | os.PathLike, *, data: str | None = None, batches: int = 16) -> dict:
    """Loss, perplexity and bits per byte of a quantized checkpoint, as ``llmarch eval`` reports
    them (``llmarch.evaluation.evaluate``): on the source run's validation split, or on ``data``."""
    from llmarch.evaluation import evaluate

    return evaluate(path, data=data, batches=batches, progress=False)
