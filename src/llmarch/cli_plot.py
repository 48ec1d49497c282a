"""``llmarch plot``: training runs' loss curves (or any logged metric) side by side in one image.

The drawing is ``llmarch.plot``'s; this module turns the flags into its arguments and its summary
into lines on the terminal. matplotlib is imported only when the command runs.
"""

from __future__ import annotations

import argparse

from llmarch.plot import DEFAULT_METRICS


def _metrics(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ValueError(
            f"--metric {text!r} is invalid: give metric names separated by commas, e.g. loss,val_loss"
        )
    return list(dict.fromkeys(names))


def _plot(args: argparse.Namespace) -> int:
    from llmarch.plot import describe, plot_runs

    if args.smooth < 1:
        raise ValueError(f"--smooth {args.smooth} is invalid: must be >= 1 (points averaged; 1: none)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("llmarch plot needs matplotlib: pip install 'llmarch[plot]'") from None
    summary = plot_runs(args.runs, args.out, metrics=_metrics(args.metric), smooth=args.smooth)
    print(describe(summary))
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    plot = sub.add_parser(
        "plot",
        parents=[common],
        help="draw runs' loss curves (or other metrics) side by side into an image",
        description="Draw each run's metrics.jsonl curves against the step, one colour per run.",
    )
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run directories of `llmarch train`")
    plot.add_argument("--out", required=True, metavar="FILE", help="the image: .png, .pdf or .svg")
    plot.add_argument(
        "--metric",
        default=",".join(DEFAULT_METRICS),
        help="metrics to draw, one panel each, separated by commas (default: %(default)s)",
    )
    plot.add_argument(
        "--smooth",
        type=int,
        default=1,
        metavar="N",
        help="draw the moving average of N points over the raw curve (default: 1, none)",
    )
    plot.set_defaults(func=_plot)
