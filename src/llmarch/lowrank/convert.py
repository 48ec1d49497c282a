"""Checkpoint to factorized checkpoint (``llmarch lowrank``).

The output is an ordinary run directory (``llmarch.sources.write_run``) whose model config records
the factorized weights (``ModelConfig.low_rank``): ``eval``, ``generate`` and the ``Engine`` build
the two-einsum layers from it, and ``llmarch train --out OUT --steps N`` (or ``--init-from OUT``)
fine-tunes the factors. ``derived.json`` reports each weight's ranks and the parameters saved.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from llmarch import accounting, sources
from llmarch.lowrank.config import LowRankConfig
from llmarch.lowrank.model import factorize_model


def lowrank_checkpoint(
    src: str | os.PathLike,
    lcfg: LowRankConfig,
    out: str | os.PathLike,
    *,
    calibration_data: str | None = None,
    calibration_samples: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Factorizes the float checkpoint ``src`` (a run or a Hugging Face directory) into the run
    directory ``out``; returns a summary (parameters before and after, seconds).

    The activation-aware variants calibrate on the first ``calibration_samples`` rows of
    ``calibration_data`` (default: the source run's training data).

    Raises:
      ValueError: a quantized or already factorized source, a non-empty ``out``, calibration data
        given for plain SVD, or missing, unreadable or too short calibration data.
    """
    source = sources.source(src)
    sources.check_out(out)
    if not lcfg.activation_aware and calibration_data is not None:
        raise ValueError("--calibration-data applies to --activation-aware factorization only")
    rows = None
    if lcfg.activation_aware:
        rows = sources.calibration(source, calibration_data, calibration_samples, what=f"{lcfg.method}")
    model = source.load()
    start = time.perf_counter()
    factored, cfg = factorize_model(model, model.cfg, lcfg, rows, progress=progress)
    seconds = time.perf_counter() - start
    before, after = accounting.param_count(model.cfg), accounting.param_count(cfg)
    ranks = {w.path: list(w.ranks) for w in cfg.low_rank or ()}
    how = {"lowrank": dataclasses.asdict(lcfg), "calibration_samples": None if rows is None else len(rows)}
    report = {"params_before": before, "params_after": after, "ranks": ranks}
    sources.write_run(factored, out, src=source, how=how, report=report)
    return {
        "source": str(source.root),
        "out": str(out),
        "method": lcfg.method,
        "weights_factorized": len(ranks),
        "params": after,
        "param_ratio": after / before,
        "seconds": round(seconds, 2),
    }
