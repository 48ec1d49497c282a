"""Training metrics: JSON lines, TensorBoard event files, and the MFU denominator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter

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


class MetricsLog:
    """Appends ``{"step": ..., **metrics}`` lines to ``metrics.jsonl`` and TensorBoard scalars."""

    def __init__(self, directory: str | Path, *, tensorboard: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        self.writer = SummaryWriter(str(self.directory / "tensorboard")) if tensorboard else None

    def truncate_after(self, step: int) -> None:
        """Drops records past ``step``: a resumed run rewrites the steps it replays."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _plain(value: Any) -> Any:
    try:
        return value.item()  # numpy / jax scalars
    except AttributeError:
        return value


def read(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
