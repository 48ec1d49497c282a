"""``llmarch export --format run``: a checkpoint as a plain llmarch run directory.

Its point is LoRA: a LoRA run's checkpoints hold its adapters alone and name their base
(``init_from``); the export merges them, ``W + (alpha/r)·A·B`` (``llmarch.lora.merge_lora``), into
one ordinary run (step 0) that needs neither the base nor llmarch's LoRA code to be read, trained
on (``llmarch train --out OUT --steps N``), quantized or exported further. Any other run or Hugging
Face directory is written as it is (``llmarch.sources.write_run``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from llmarch import sources
from llmarch.hf import dtype_name
from llmarch.inference.loading import load_for_inference


def export_run(checkpoint: str | os.PathLike, out: str | os.PathLike, *, dtype: Any = None) -> dict[str, Any]:
    """Writes ``checkpoint`` (merged, for a LoRA run) as the run directory ``out``; returns a summary.

    Raises:
      FileNotFoundError: no such checkpoint.
      ValueError: ``out`` exists and is not empty, a bad ``dtype``, a quantized source.
    """
    name = None if dtype is None else dtype_name(dtype)
    src = sources.source(checkpoint, what="--checkpoint")
    sources.check_out(out)
    lora = (src.train or {}).get("lora")
    model, cfg, _ = load_for_inference(src.root, dtype=name)  # a LoRA run comes back merged
    how = {"export": "run", "merged_lora": lora, "base": (src.train or {}).get("init_from")}
    sources.write_run(model, out, src=dataclasses.replace(src, cfg=cfg), how=how)
    return {
        "format": "run",
        "source": str(src.root),
        "out": str(out),
        "merged_lora": lora is not None,
        "dtype": cfg.param_dtype,
    }
