"""Curves of training runs side by side: ``llmarch plot RUN [RUN ...] --out FILE.png``.

Comparing runs is what a researcher does most after training them, and reading two
``metrics.jsonl`` files by eye does not show which one learns faster. Each metric gets a panel
with the step on its x axis and one colour per run, the same colour in every panel; ``smooth``
draws a trailing moving average over the raw curve (drawn faint), since per-step training loss
is noisy. Drawing uses matplotlib's object API (a ``Figure`` saved by the Agg canvas), not
``pyplot``, so plotting changes no global backend or state in the caller's process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmarch.run_format import METRICS_FILE, existing_dir

DEFAULT_METRICS = ("loss", "val_loss")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run's metrics: ``label`` names it in the legend."""

    label: str
    path: Path
    records: list[dict[str, Any]]

    def metrics(self) -> list[str]:
        """The numeric metrics its records hold, in the order they first appear."""
        names: dict[str, None] = {}
        for r in self.records:
            names.update((k, None) for k, v in r.items() if k != "step" and _is_number(v))
        return list(names)

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of ``metric``, in step order."""
        points = sorted((r["step"], float(r[metric])) for r in self.records if _is_number(r.get(metric)))
        steps, values = zip(*points, strict=True) if points else ((), ())
        return np.asarray(steps, np.int64), np.asarray(values, np.float64)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """The runs in ``paths`` (directories of ``llmarch train``), each labelled by its directory's
    name, or by the path as given where two runs share a name.

    Raises:
      FileNotFoundError: a path is not a directory.
      ValueError: a run has no ``metrics.jsonl`` or no records in it, or a record is not JSON.
    """
    from llmarch.train.metrics import read  # the trainer's reader, imported only to plot

    if not paths:
        raise ValueError("runs=[] is invalid: give at least one run directory")
    runs = []
    for given in paths:
        root = existing_dir(given, f"a run directory of `llmarch train` with {METRICS_FILE}", what="run")
        file = root / METRICS_FILE
        if not file.is_file():
            raise ValueError(
                f"run {str(given)!r} has no {METRICS_FILE}: it is not a training run, or it logged nothing"
            )
        records = [r for r in read(file) if isinstance(r, dict) and isinstance(r.get("step"), int)]
        if not records:
            raise ValueError(f"run {str(given)!r} has no metrics: its {METRICS_FILE} holds no step records")
        runs.append(Run(root.resolve().name or str(given), root, records))
    labels = [r.label for r in runs]
    return [
        dataclasses.replace(r, label=str(given)) if labels.count(r.label) > 1 else r
        for r, given in zip(runs, paths, strict=True)
    ]


def missing_metrics(runs: Sequence[Run], metrics: Sequence[str]) -> dict[str, list[str]]:
    """``metric -> labels of the runs without it``, for the metrics some run lacks.

    Raises:
      ValueError: ``metrics`` is empty, or names a metric that no run has (naming those present).
    """
    if not metrics:
        raise ValueError("metrics=[] is invalid: name at least one metric, e.g. loss,val_loss")
    present = {r.label: r.metrics() for r in runs}
    missing = {}
    for metric in metrics:
        without = [label for label, names in present.items() if metric not in names]
        if len(without) == len(runs):
            every = ", ".join(dict.fromkeys(n for names in present.values() for n in names)) or "none"
            if any(metric in record for run in runs for record in run.records):
                raise ValueError(f"metric {metric!r} is not a number (a per-layer list?); numbers: {every}")
            raise ValueError(f"metric {metric!r} is in no run's {METRICS_FILE}; present: {every}")
        if without:
            missing[metric] = without
    return missing


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """The trailing mean of the last ``window`` values at each point (fewer at the start)."""
    total = np.cumsum(np.concatenate([[0.0], values]))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (total[1:] - total[np.arange(1, len(values) + 1) - counts]) / counts


def draw(runs: Sequence[Run], metrics: Sequence[str], *, smooth: int | Mapping[str, int] = 1):
    """A matplotlib ``Figure``: one panel per metric, one colour per run.

    ``smooth``: points averaged, for every metric, or per metric (``{"loss": 10}``: a validation
    loss evaluated a few times is not averaged with the per-step training loss); those a mapping
    leaves out are drawn raw. Non-finite points (a skipped step's loss) are left out of the lines
    and the averages.
    """
    _check_smooth(smooth)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(metrics), 4.0), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, metric in zip(axes, metrics, strict=True):
        window = smooth.get(metric, 1) if isinstance(smooth, Mapping) else smooth
        for run, colour in zip(runs, colours, strict=True):
            steps, values = run.curve(metric)
            keep = np.isfinite(values)
            steps, values = steps[keep], values[keep]
            if not len(steps):
                continue
            if window > 1:
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                values = moving_average(values, window)
            ax.plot(steps, values, color=colour, label=run.label, marker="o" if len(steps) == 1 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(metric + (f" (moving average of {window})" if window > 1 else ""))
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_runs(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    smooth: int | Mapping[str, int] = 1,
) -> dict[str, Any]:
    """Draws ``metrics`` of the runs in ``paths`` and saves the figure to ``out`` (its suffix
    picks the format: .png, .pdf, .svg, ...); ``smooth`` as in ``draw``.

    Returns:
      ``{"out": path, "runs": {label: path}, "metrics": [...], "missing": {metric: [labels]}}``.

    Raises:
      ValueError: bad ``out``, ``metrics`` or ``smooth``, or runs without metrics (see
        ``load_runs``, ``missing_metrics``); checked before anything is drawn.
    """
    out = Path(out)
    formats = _formats()
    if out.suffix.lstrip(".").lower() not in formats:
        raise ValueError(
            f"out={str(out)!r} is invalid: its suffix names the image format; allowed: "
            + ", ".join(f".{f}" for f in formats)
        )
    if out.is_dir():
        raise ValueError(f"out={str(out)!r} is a directory: give a file such as curves.png")
    _check_smooth(smooth)
    runs = load_runs(paths)
    missing = missing_metrics(runs, metrics)
    fig = draw(runs, metrics, smooth=smooth)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return {
        "out": str(out),
        "runs": {r.label: str(r.path) for r in runs},
        "metrics": list(metrics),
        "missing": missing,
    }


def _check_smooth(smooth: Any) -> None:
    if isinstance(smooth, Mapping):
        for window in smooth.values():
            _check_smooth(window)
        return
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth={smooth!r} is invalid: must be an integer >= 1 (points averaged; 1: none)")


def _formats() -> list[str]:
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def describe(summary: dict[str, Any]) -> str:
    """One line per fact of ``plot_runs``'s summary, for the command line."""
    lines = [f"wrote {summary['out']}: {', '.join(summary['metrics'])} of {', '.join(summary['runs'])}"]
    for metric, labels in summary["missing"].items():
        lines.append(f"note: no {metric} in {', '.join(labels)}")
    return "\n".join(lines)
