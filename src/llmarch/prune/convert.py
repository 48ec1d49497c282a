"""Checkpoint to pruned checkpoint (``llmarch prune``).

The output is an ordinary run directory (``llmarch.sources.write_run``): ``eval``, ``generate``, the
``Engine`` and ``quantize`` read it as any run, and ``llmarch train --out OUT --steps N`` fine-tunes
it with the source run's recipe. Unstructured and N:M pruning write ``keep_sparsity=True`` into the
run, so the zeros stay zeros through that fine-tuning; ``derived.json`` reports the sparsity each
weight reached.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from llmarch import accounting, sources
from llmarch.prune.config import PruneConfig
from llmarch.prune.model import prune, sparsity
from llmarch.prune.structured import prune_structured


def prune_checkpoint(
    src: str | os.PathLike,
    pcfg: PruneConfig,
    out: str | os.PathLike,
    *,
    structured: str | None = None,
    criterion: str = "auto",
    calibration_data: str | None = None,
    calibration_samples: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Prunes the float checkpoint ``src`` (a run or a Hugging Face directory) into the run
    directory ``out``; returns a summary (the sparsity reached, seconds).

    Wanda and SparseGPT calibrate on the first ``calibration_samples`` rows of
    ``calibration_data`` (default: the source run's training data). With ``structured``
    ("heads", "channels" or "experts") whole units go instead (``prune_structured``: the fraction
    ``pcfg.sparsity`` of them, chosen by ``criterion``), and the run's model is smaller.

    Raises:
      ValueError: a quantized source, a non-empty ``out``, calibration data given for magnitude
        pruning, or missing, unreadable or too short calibration data.
    """
    source = sources.source(src)
    sources.check_out(out)
    if structured is not None:
        return _structured(source, pcfg, out, structured, criterion, calibration_data, calibration_samples)
    if pcfg.method == "magnitude" and calibration_data is not None:
        raise ValueError("--calibration-data applies to wanda and sparsegpt, not method='magnitude'")
    rows = None
    if pcfg.method != "magnitude":
        rows = sources.calibration(
            source, calibration_data, calibration_samples, what=f"--method {pcfg.method}"
        )
    model = source.load()
    start = time.perf_counter()
    pruned = prune(model, model.cfg, pcfg, rows, progress=progress)
    seconds = time.perf_counter() - start
    reached = sparsity(pruned, model.cfg, include_lm_head=pcfg.include_lm_head)
    how = {"prune": dataclasses.asdict(pcfg), "calibration_samples": None if rows is None else len(rows)}
    sources.write_run(pruned, out, src=source, how=how, keep_sparsity=True, report={"sparsity": reached})
    return {
        "source": str(source.root),
        "out": str(out),
        "method": pcfg.method,
        "pattern": pcfg.pattern,
        "sparsity": reached["total"],
        "seconds": round(seconds, 2),
    }


def _structured(source, pcfg, out, target, criterion, calibration_data, samples) -> dict[str, Any]:
    if pcfg.method != "magnitude" or pcfg.pattern is not None or pcfg.scope != "layer":
        raise ValueError(
            "structured pruning chooses units by --criterion (auto, magnitude, activation, load); "
            "--method, --pattern and --scope apply to unstructured pruning"
        )
    if criterion == "magnitude" and calibration_data is not None:
        raise ValueError("--calibration-data does not apply to --criterion magnitude")
    rows = None
    if criterion != "magnitude" and (calibration_data is not None or source.train is not None):
        rows = sources.calibration(source, calibration_data, samples, what=f"--structured {target}")
    model = source.load()
    start = time.perf_counter()
    pruned, cfg = prune_structured(
        model, model.cfg, target, pcfg.sparsity, calibration=rows, criterion=criterion
    )
    seconds = time.perf_counter() - start
    before, after = accounting.param_count(model.cfg), accounting.param_count(cfg)
    how = {
        "structured": target,
        "fraction": pcfg.sparsity,
        "criterion": criterion,
        "calibration_samples": None if rows is None else len(rows),
    }
    report = {"params_before": before, "params_after": after, "config_changes": _changes(model.cfg, cfg)}
    sources.write_run(pruned, out, src=source, how=how, report=report)
    return {
        "source": str(source.root),
        "out": str(out),
        "structured": target,
        "params": after,
        "params_removed": 1 - after / before,
        "seconds": round(seconds, 2),
    }


def _changes(old, new) -> dict[str, Any]:
    """The config fields (dotted) that structured pruning changed: ``{field: [old, new]}``."""
    a, b = json.loads(old.to_json()), json.loads(new.to_json())
    out = {}
    for key in a:
        if isinstance(a[key], dict) and isinstance(b.get(key), dict):
            out.update({f"{key}.{k}": [a[key][k], b[key][k]] for k in a[key] if a[key][k] != b[key].get(k)})
        elif a[key] != b.get(key):
            out[key] = [a[key], b.get(key)]
    return out
