"""``--profile-steps A:B``: a jax.profiler trace of steps A..B-1 in the run's profile/ directory."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from llmarch import cli
from llmarch.train.config import TrainConfig
from llmarch.train.profile import StepProfiler, parse_profile_steps


def _step_runs(trace_dir) -> set[str]:
    """The run ids of the train step's XLA executions that a Perfetto trace holds."""
    (path,) = trace_dir.rglob("perfetto_trace.json.gz")
    events = json.load(gzip.open(path))["traceEvents"]
    return {e["args"].get("run_id") for e in events if e.get("args", {}).get("hlo_module") == "jit_step"}


def test_cli_train_profile_steps_traces_the_chosen_step(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--steps", "4", "--seq-len", "32", "--batch-size", "4"]
    argv += ["--eval-every", "4", "--eval-batches", "1", "--no-tensorboard", "--profile-steps", "2:3"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().err  # the run's summary, logged
    traces = list((out / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert f"  profile      {(out / 'profile').resolve()} (steps 2-2: " in printed
    # The trace holds the train step's device work, of step 2 only (one execution, not 3 or 4).
    assert len(_step_runs(out / "profile")) == 1
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["profile_steps"] == "2:3"


def _work(x):
    return jax.jit(lambda a: a @ a)(x)


def test_profiler_stops_at_the_last_step_when_training_ends_inside_the_range(tmp_path):
    profiler = StepProfiler("2:10", tmp_path)
    x = jnp.ones((32, 32))
    for step in (1, 2, 3):
        profiler.before(step)
        profiler.after(step, _work(x), last=step == 3)
    assert profiler.traced == (2, 3) and profiler.directory == tmp_path / "profile"
    assert not profiler.active and list(profiler.directory.rglob("*.xplane.pb"))
    jax.profiler.start_trace(str(tmp_path / "again"))  # nothing left running: a new trace starts
    jax.profiler.stop_trace()


def test_profiler_close_ends_a_trace_cut_short_and_a_range_passed_traces_nothing(tmp_path):
    cut = StepProfiler("1:5", tmp_path / "cut")
    cut.before(1)  # the step raises before `after`: the trainer's finally closes
    cut.close()
    assert cut.directory == tmp_path / "cut" / "profile" and cut.traced == (1, 1)
    resumed = StepProfiler("2:3", tmp_path / "resumed")  # a resumed run starting at step 5
    resumed.before(5)
    resumed.after(5, _work(jnp.ones(4)), last=True)
    resumed.close()
    assert resumed.directory is None and not (tmp_path / "resumed").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("3:2", "with 1 <= A < B"),
        ("0:2", "with 1 <= A < B"),
        ("2:2", "with 1 <= A < B"),
        ("2", "must be 'A:B'"),
        ("a:b", "must be 'A:B'"),
        ("5:9", r"starts after the last step \(steps=4\)"),
    ],
)
def test_bad_profile_steps_are_rejected_naming_the_field(tmp_path, spec, message):
    with pytest.raises(ValueError, match=rf"TrainConfig.profile_steps='{spec}'.*{message}"):
        TrainConfig(out_dir=str(tmp_path), steps=4, profile_steps=spec)


def test_profile_steps_parse_and_cli_errors(tmp_path, capsys):
    assert parse_profile_steps(" 2 : 5 ") == (2, 5)
    assert cli.main(["train", "--out", str(tmp_path / "x"), "--steps", "4", "--profile-steps", "3:2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmarch train: error: TrainConfig.profile_steps='3:2'")
    assert not (tmp_path / "x").exists()  # rejected before anything was made or compiled
