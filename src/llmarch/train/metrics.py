"""Training metrics: the MFU denominator, which of a train step's outputs a record holds, the
progress bar's text, and reading ``metrics.jsonl`` back (the writers are ``llmarch.train.trackers``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmarch.config import ModelConfig
from llmarch.train.trackers import JsonlTracker, TensorBoardTracker, Trackers

# Dense peak FLOP/s per chip at the precision training uses (bf16 on accelerators).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops(device_kind: str) -> float | None:
    """The chip's peak from ``PEAK_FLOPS`` by the longest matching name; None if unknown (CPUs)."""
    matches = [name for name in PEAK_FLOPS if device_kind.startswith(name)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


# A train step's own outputs (``llmarch.train.step``); everything else it returns is the layers'.
STEP_OUTPUTS = ("loss", "z_loss", "aux_loss", "grad_norm", "finite", "distill_loss", "mtp_loss")


def aux_loss_active(cfg: ModelConfig) -> bool:
    """Whether the layers add a weighted loss of their own to the objective: an MoE balance or
    router z-loss with a coefficient > 0, or a TDQKR memory's singular-value loss. Without one,
    ``aux_loss`` is a constant 0 and not worth a curve."""
    fields = {kind.config_field for _, kind in cfg.used_kinds()}
    moe, memory = cfg.moe, cfg.memory
    if "moe" in fields and moe is not None:
        if moe.aux_loss_coef or moe.seq_aux_loss_coef or moe.z_loss_coef:
            return True
    return "memory" in fields and memory is not None and bool(memory.tucker_rank and memory.aux_alpha)


def layer_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The layers' metrics of a step (``[layers]`` or ``[layers, ...]`` arrays, e.g. MoE
    ``load_ratio`` and ``expert_load``) as JSON: per-layer scalars as their mean (and ``_max``),
    anything larger as nested lists."""
    out: dict[str, Any] = {}
    for name, value in m.items():
        if name in STEP_OUTPUTS:
            continue
        value = np.asarray(value)
        if value.ndim <= 1:
            out[name], out[f"{name}_max"] = float(value.mean()), float(value.max())
        else:
            out[name] = value.tolist()
    return out


def progress_text(record: dict[str, Any]) -> str:
    """The progress bar's summary of a step's record: loss, throughput, MFU, learning rate."""
    parts = [f"loss {record['loss']:.3f}"]
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"MFU {record['mfu']:.1%}")
    if "learning_rate" in record:
        parts.append(f"lr {record['learning_rate']:.2e}")
    return ", ".join(parts)


class MetricsLog(Trackers):
    """``metrics.jsonl`` and TensorBoard scalars as one ``Trackers`` (``llmarch.train.trackers``):
    ``write(step, metrics)``, ``sync()``, ``close()``.

    Opened with ``start``, the step the run starts from (0 for a fresh start), it first drops
    every record past ``start``, atomically: a fresh start in an old directory does not append
    after the old steps, and a resumed run rewrites the steps it replays, so every step is in
    the log exactly once. TensorBoard is told the same (``purge_step``). ``sync`` makes every
    point written so far durable; the trainer calls it before each checkpoint, so a ``kill -9``
    loses no point that the resumed run does not write again.
    """

    def __init__(self, directory: str | Path, *, start: int = 0, tensorboard: bool = True):
        jsonl = JsonlTracker(directory, start=start)
        super().__init__([jsonl, *([TensorBoardTracker(directory, start=start)] if tensorboard else [])])
        self.directory, self.path = Path(directory), jsonl.path


def read(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    path = Path(path)
    records = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i + 1} is not valid JSON ({e})") from None
    return records
