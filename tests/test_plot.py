"""``llmarch plot``: runs' metrics.jsonl curves drawn into one image."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from llmarch import cli
from llmarch.plot import Run, draw, load_runs, moving_average, plot_runs
from llmarch.train import metrics
from llmarch.train.config import TrainConfig
from llmarch.train.trainer import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs: a real tiny one, and a copy of its metrics.jsonl with every loss 0.5 higher."""
    root = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(
        out_dir=str(root / "base"),
        steps=4,
        seq_len=32,
        batch_size=4,
        eval_every=2,
        eval_batches=1,
        log_every=1,
        progress=False,
        tensorboard=False,
    )
    train(cfg, log=lambda s: None)
    (root / "worse").mkdir()
    records = metrics.read(root / "base" / "metrics.jsonl")
    shifted = [{k: v + 0.5 if k in ("loss", "val_loss") else v for k, v in r.items()} for r in records]
    (root / "worse" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shifted))
    return root / "base", root / "worse"


def _llmarch(*args):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run(
        [sys.executable, "-m", "llmarch.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_plot_writes_a_png_of_both_runs(runs, tmp_path, capsys):
    out = tmp_path / "figs" / "curves.png"
    assert cli.main(["plot", *map(str, runs), "--out", str(out), "--smooth", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: loss, val_loss of base, worse")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 0
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something was drawn


def test_the_figure_holds_each_runs_curves_labelled_and_coloured_by_run(runs):
    loaded = load_runs(runs)
    fig = draw(loaded, ["loss", "val_loss"])
    loss_ax, val_ax = fig.axes
    base = [r for r in metrics.read(runs[0] / "metrics.jsonl") if "loss" in r]
    lines = loss_ax.get_lines()
    assert [line.get_label() for line in lines] == ["base", "worse"]
    np.testing.assert_array_equal(lines[0].get_xdata(), [r["step"] for r in base])
    np.testing.assert_allclose(lines[0].get_ydata(), [r["loss"] for r in base])
    np.testing.assert_allclose(lines[1].get_ydata(), np.asarray([r["loss"] for r in base]) + 0.5)
    assert [list(line.get_xdata()) for line in val_ax.get_lines()] == [[2, 4], [2, 4]]
    assert lines[0].get_color() == val_ax.get_lines()[0].get_color() != lines[1].get_color()


def test_moving_average_and_same_named_runs(runs, tmp_path):
    np.testing.assert_allclose(moving_average(np.array([1.0, 2.0, 3.0, 5.0]), 2), [1.0, 1.5, 2.5, 4.0])
    for parent in ("a", "b"):
        shutil.copytree(runs[0], tmp_path / parent / "run")
    loaded = load_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"])
    assert [r.label for r in loaded] == [str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")]


def test_a_metric_only_some_runs_have_is_noted(runs, tmp_path):
    summary = plot_runs(runs, tmp_path / "g.svg", metrics=["loss", "step_time"])
    assert summary["missing"] == {}
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    summary = plot_runs([runs[0], tmp_path / "short"], tmp_path / "h.png")
    assert summary["missing"] == {"val_loss": ["short"]} and (tmp_path / "h.png").stat().st_size > 0
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "expert_load": [[0.5, 0.5]]}\n')
    with pytest.raises(ValueError, match="metric 'expert_load' is not a number .*; numbers: loss"):
        plot_runs([tmp_path / "moe"], tmp_path / "i.png", metrics=["expert_load"])


def _one_line_error(result) -> str:
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("llmarch plot: error: "), result.stderr
    return result.stderr


def test_errors_are_one_line_with_exit_2(runs, tmp_path):
    out = str(tmp_path / "x.png")
    err = _one_line_error(_llmarch("plot", str(tmp_path / "nowhere"), "--out", out))
    assert "run directory" in err and "nowhere" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert "has no metrics.jsonl" in _one_line_error(_llmarch("plot", str(tmp_path / "empty"), "--out", out))
    err = _one_line_error(_llmarch("plot", str(runs[0]), "--out", out, "--metric", "loss,bleu"))
    assert "metric 'bleu' is in no run's metrics.jsonl; present: loss, perplexity, grad_norm" in err
    assert not Path(out).exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--smooth", "0"], "--smooth 0 is invalid"),
        (["--metric", "loss,,val_loss"], "--metric 'loss,,val_loss' is invalid"),
        (["--out", "curves.txt"], "out='curves.txt' is invalid: its suffix names the image format"),
    ],
)
def test_bad_flags(runs, tmp_path, capsys, flags, message):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "metrics.jsonl").write_text("")
    argv = ["plot", str(runs[0]), "--out", str(tmp_path / "x.png"), *flags]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path / "records"), "--out", str(tmp_path / "x.png")]) == 2
    assert "has no metrics: its metrics.jsonl holds no step records" in capsys.readouterr().err


def test_smooth_per_metric_leaves_the_others_raw():
    records = [{"step": i, "loss": 3.0 - 0.1 * i} for i in range(1, 11)] + [{"step": 10, "val_loss": 2.0}]
    fig = draw([Run("a", Path("a"), records)], ["loss", "val_loss"], smooth={"loss": 4})
    assert [ax.get_title() for ax in fig.axes] == ["loss (moving average of 4)", "val_loss"]
    assert len(fig.axes[0].lines) == 2 and len(fig.axes[1].lines) == 1  # raw + average; raw only
    with pytest.raises(ValueError, match="smooth=0 is invalid"):
        draw([Run("a", Path("a"), records)], ["loss"], smooth={"loss": 0})
