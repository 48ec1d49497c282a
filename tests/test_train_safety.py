"""Training safety (issue 12): no run ends "successfully" broken, checkpoints are verified,
a failed resume changes nothing, one writer per run, signals save, the CLI says one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmarch import cli, presets
from llmarch.evaluation import evaluate
from llmarch.model import Transformer
from llmarch.run_format import CONFIG_FILE, LOCK_FILE, MANIFEST
from llmarch.train import metrics, run_dir, trackers
from llmarch.train.checkpoint import Checkpointer, CheckpointError
from llmarch.train.config import TrainConfig
from llmarch.train.evaluate import restore_run
from llmarch.train.guard import DEAD_STEPS, RunHealth, TrainingError
from llmarch.train.optim import OptimizerConfig
from llmarch.train.step import make_train_step
from llmarch.train.trainer import train

SMALL = dict(
    seq_len=32, batch_size=8, eval_every=1000, eval_batches=2, log_every=1, progress=False, tensorboard=False
)
WILD = OptimizerConfig(name="sgd", learning_rate=1e30, clip_norm=None, schedule="constant")


def _cfg(tmp_path, name="run", **changes):
    return TrainConfig(out_dir=str(tmp_path / name), **{**SMALL, **changes})


def _run(tmp_path, name="run", **changes):
    return train(_cfg(tmp_path, name, **changes), log=lambda s: None)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _corrupt(step_dir, nbytes=64):
    """Flips ``nbytes`` bytes in the middle of the step's largest file."""
    target = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    data[mid : mid + nbytes] = bytes(b ^ 0xFF for b in data[mid : mid + nbytes])
    target.write_bytes(bytes(data))
    return target


# The step accepts only finite updates -------------------------------------------------------


def test_step_rejects_a_non_finite_update_built_from_finite_gradients():
    model = Transformer(presets.get("tiny-dense"), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.scale(-np.inf)  # finite loss and gradients, but a non-finite update
    step = make_train_step(graphdef, tx)
    tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 250
    new_params, _, m = step(params, rest, tx.init(params), {"inputs": tokens, "targets": tokens})
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert not bool(m["finite"])
    for a, b in zip(_leaves(new_params), _leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_run_health_warns_on_dead_model_and_spikes_and_stops_on_skips():
    warnings = []
    health = RunHealth(100, 0.05, warn=warnings.append)
    for step in range(1, 15):
        health.observe(step, 3.0, 1.0, True, 0)
    health.observe(15, 9.0, 1.0, True, 0)
    assert len(warnings) == 1 and "far above its running level" in warnings[0]
    for step in range(16, 16 + DEAD_STEPS):
        health.observe(step, 5.5, 0.0, True, 0)
    assert len(warnings) == 2 and "stopped learning" in warnings[1]
    for skipped in range(1, 6):
        health.observe(40 + skipped, float("nan"), float("nan"), False, skipped)  # 5 of 100 allowed
    with pytest.raises(TrainingError, match="6 of 46 steps were skipped.*max_skipped_fraction=0.05"):
        health.observe(46, float("nan"), float("nan"), False, 6)


def test_divergence_fails_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # lr 1e30: step 1's update is finite (weights ~1e30), every later loss is not.
    with pytest.raises(TrainingError, match=r"steps were skipped.*last checkpoint is .*checkpoints/1"):
        _run(tmp_path, "skip", steps=6, optimizer=WILD, checkpoint_every=1)
    assert Checkpointer(tmp_path / "skip" / "checkpoints", save_every=1, keep=3).steps() == [1]
    # That checkpoint's weights are finite but useless: eval fails rather than print NaN.
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "skip"), "--batches", "1"]) == 1
    assert "gives a non-finite loss (nan)" in _one_error_line(capsys)
    # Skipping everything allowed: skipped steps leave the state alone, and a run whose model
    # is broken (validation loss NaN) still fails rather than exiting "successfully".
    with pytest.raises(TrainingError, match="validation loss nan"):
        _run(tmp_path, "tolerant", steps=4, optimizer=WILD, max_skipped_fraction=1.0)
    with pytest.raises(TrainingError, match=r"step 2: .*not finite.*nan_policy='stop'.*checkpoints/1"):
        _run(tmp_path, "stop", steps=4, optimizer=WILD, nan_policy="stop", checkpoint_every=1)


# Validation before anything runs ------------------------------------------------------------


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: OptimizerConfig(learning_rate=float("inf")), r"learning_rate=inf is invalid"),
        (lambda: OptimizerConfig(weight_decay=float("nan")), r"weight_decay=nan is invalid"),
        (lambda: OptimizerConfig(b2=1.5), r"b2=1.5 is invalid"),
        (lambda: TrainConfig(out_dir="x", z_loss=float("nan")), r"z_loss=nan is invalid"),
        (lambda: TrainConfig(out_dir="x", peak_flops=-1.0), r"peak_flops=-1.0 is invalid"),
        (lambda: TrainConfig(out_dir="x", val_fraction=1.0), r"val_fraction=1.0 is invalid"),
        (lambda: TrainConfig(out_dir="x", resume="maybe"), r"resume='maybe' is unknown"),
        (lambda: TrainConfig(out_dir="x", preset="nope"), r"preset='nope' is unknown"),
        (
            lambda: TrainConfig.from_dict({"out_dir": "x", "optimizer": {"learning_rate": "0.01"}}),
            r"optimizer.learning_rate='0.01' is invalid: must be a number",
        ),
        (lambda: TrainConfig.from_dict({"out_dir": "x", "mesh": 2}), r"mesh=2 is invalid: must be a string"),
        (
            lambda: TrainConfig.from_dict({"out_dir": "x", "tensorboard": "no"}),
            r"tensorboard='no' is invalid",
        ),
        (
            lambda: TrainConfig.from_dict({"out_dir": "x", "model": {"d_model": 8}}),
            r"TrainConfig.model is missing the required fields \['vocab_size'",
        ),
        (lambda: TrainConfig.from_dict({"out_dir": "x", "steps": 2.5}), r"steps=2.5 is invalid"),
        (
            lambda: OptimizerConfig(warmup_steps=99999999999),
            r"warmup_steps=99999999999 is invalid: must be an "
            r"integer in \[0, 2147483647\]",
        ),
        (
            lambda: TrainConfig(out_dir="x", steps=5, optimizer=OptimizerConfig(grad_accum_steps=10)),
            r"grad_accum_steps=10 exceeds TrainConfig.steps=5: no update would ever be applied",
        ),
        (lambda: TrainConfig(out_dir="x", seed=-1), r"seed=-1 is invalid"),
        (lambda: TrainConfig(out_dir="x", mesh=""), r"mesh='' is invalid"),
        (lambda: TrainConfig(out_dir="x", steps=np.int64(3)), r"steps=np.int64\(3\) is invalid: must be"),
    ],
)
def test_bad_values_are_rejected_on_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    config = tmp_path / "cfg.json"
    for content, match in [
        ("[1, 2]", "must hold a JSON object"),
        ('{"out_dir": "o", "learning_rate": "0.01"}', "unknown fields"),
        ('{"out_dir": "o", "optimizer": {"learning_rate": "0.01"}}', "must be a number"),
    ]:
        config.write_text(content)
        assert cli.main(["train", "--config", str(config)]) == 2
        err = _one_error_line(capsys)
        assert err.startswith("llmarch train: error: --config") and match in err, err
    assert cli.main(["train", "--out", str(config), "--steps", "1"]) == 2
    assert "is an existing file" in _one_error_line(capsys)
    for flags in (["--lr", "inf"], ["--weight-decay", "nan"], ["--z-loss", "nan"], ["--peak-flops", "-1"]):
        assert cli.main(["train", "--out", str(tmp_path / "o"), *flags]) == 2
        assert "is invalid" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()  # rejected before anything was written
    assert cli.main(["eval", "--checkpoint", "/bin/ls"]) == 2
    assert "is not a directory" in _one_error_line(capsys)


# Checkpoints you can trust --------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run with checkpoints at 2 and 4; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("finished")
    result = _run(root, "run", steps=4, checkpoint_every=2)
    return root / "run", result


def _copy(finished_run, tmp_path, name="run"):
    shutil.copytree(finished_run[0], tmp_path / name)
    return tmp_path / name


def test_checkpoints_are_sealed_with_a_manifest_holding_the_config(finished_run):
    ckpt = Checkpointer(finished_run[0] / "checkpoints", save_every=2, keep=3, read_only=True)
    assert ckpt.steps() == [2, 4]
    manifest = ckpt.verify(4)
    assert manifest["config"]["out_dir"] == str(finished_run[0]) and manifest["config"]["steps"] == 4
    assert all(len(f["blake2b"]) == 128 for f in manifest["files"].values())
    saved = json.loads((finished_run[0] / CONFIG_FILE).read_text())
    assert os.path.isabs(saved["out_dir"])


def test_corruption_is_detected_by_eval_generate_and_train(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    _corrupt(run / "checkpoints" / "4")
    step_dir = str(run / "checkpoints" / "4")
    with pytest.raises(CheckpointError, match=f"checkpoint {step_dir} is corrupted"):
        evaluate(run, batches=1, progress=False)
    for argv in (
        ["eval", "--checkpoint", str(run), "--batches", "1"],
        ["generate", "--checkpoint", str(run), "--prompt", "hi", "--max-tokens", "2"],
        [
            "train",
            "--out",
            str(run),
            "--steps",
            "6",
            "--checkpoint-every",
            "2",
            "--seq-len",
            "32",
            "--batch-size",
            "8",
            "--no-tensorboard",
        ],
    ):
        assert cli.main(argv) == 2, argv
        err = _one_error_line(capsys)
        assert f"checkpoint {step_dir} is corrupted" in err, err
    assert (run / "checkpoints" / "4").is_dir()  # train changed nothing
    # Asked to, train sets the corrupted step aside and resumes from the newest intact one;
    # the result is exactly the uninterrupted run's.
    resumed = _run(tmp_path, "run", steps=4, checkpoint_every=2, resume="fallback")
    assert sorted(resumed.losses) == [3, 4]
    assert len(list((tmp_path / "run" / "checkpoints_set_aside").iterdir())) == 1
    for a, b in zip(_leaves(resumed.params), _leaves(finished_run[1].params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in metrics.read(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_a_mismatching_resume_names_the_fields_and_changes_nothing(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(
        CheckpointError,
        match=r"another configuration \(preset: \"tiny-dense\" in the "
        r"checkpoint, \"tiny-gqa\" now; seq_len: 32 in the checkpoint, "
        r"64 now\)",
    ):
        _run(tmp_path, "run", steps=6, checkpoint_every=2, preset="tiny-gqa", seq_len=64)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    assert after == {p: b for p, b in before.items() if p.name != LOCK_FILE}
    assert restore_run(run)[3] == 4  # the good run is still usable


def test_resume_modes_and_unfinished_saves(finished_run, tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint to resume from"):
        _run(tmp_path, "fresh", steps=2, resume="must")
    run = _copy(finished_run, tmp_path)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \[2, 4\]"):
        _run(tmp_path, "run", steps=4, resume="never")
    # A kill between orbax's finalize and our manifest leaves an unsealed newest step, and a kill
    # inside orbax's write leaves a temporary directory: both are set aside or cleaned, and the
    # run replays from step 2 to exactly the same final state.
    (run / "checkpoints" / "4" / MANIFEST).unlink()
    shutil.copytree(run / "checkpoints" / "2", run / "checkpoints" / "6.orbax-checkpoint-tmp-1")
    resumed = _run(tmp_path, "run", steps=4, checkpoint_every=2)
    assert sorted(resumed.losses) == [3, 4]
    for a, b in zip(_leaves(resumed.params), _leaves(finished_run[1].params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert Checkpointer(run / "checkpoints", save_every=2, keep=3).steps() == [2, 4]


def test_fallback_with_nothing_intact_fails(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    for step in (2, 4):
        (run / "checkpoints" / str(step) / MANIFEST).write_text("x")
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* was corrupted \(2 set aside"):
        _run(tmp_path, "run", steps=4, checkpoint_every=2, resume="fallback")


def test_a_changed_corpus_is_caught_on_resume_and_a_failed_save_fails_the_run(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    _run(tmp_path, "run", steps=2, checkpoint_every=2, data=str(corpus))
    corpus.write_text("a different text entirely, of another length! " * 150)
    with pytest.raises(CheckpointError, match=r"another configuration \(the training or validation tokens"):
        _run(tmp_path, "run", steps=4, checkpoint_every=2, data=str(corpus))

    def full_disk(*args, **kwargs):
        raise ValueError("RESOURCE_EXHAUSTED: Error writing: No space left on device")

    monkeypatch.setattr(Checkpointer, "save", lambda self, *a, **k: full_disk())
    with pytest.raises(
        TrainingError,
        match=r"saving .*checkpoints/2 failed \(RESOURCE_EXHAUSTED.*no "
        r"checkpoint exists",
    ):
        _run(tmp_path, "full", steps=2, checkpoint_every=2)


def test_rotation_keeps_the_newest_intact_checkpoints(tmp_path):
    _run(tmp_path, "rot", steps=5, checkpoint_every=1, keep_checkpoints=2)
    ckpt = Checkpointer(tmp_path / "rot" / "checkpoints", save_every=1, keep=2)
    assert ckpt.steps() == [4, 5] and all(ckpt.intact(s) for s in (4, 5))


def test_a_train_state_is_saved_as_the_dict_checkpoints_have_always_held(tmp_path):
    """``TrainState`` goes to disk as the dict ``{params, rest, opt_state, step, rng, skipped}``
    (its ``as_dict``), so checkpoints written before the class existed restore into one."""
    import dataclasses

    import grain

    from llmarch.train.state import TrainState
    from llmarch.train.trainer import init_state

    _, _, state = init_state(_cfg(tmp_path), mesh=None)
    state = dataclasses.replace(state, step=jnp.int32(7), skipped=jnp.int32(2))
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1, keep=1)
    try:
        ckpt.save(7, state, iter(grain.MapDataset.range(1).to_iter_dataset()), force=True)
        as_dict = ckpt.restore(7, state.as_dict())  # read as the old code reads it
        typed = ckpt.restore(7, state)
    finally:
        ckpt.close()
    # Every field but ``frozen`` (a LoRA run's base, never checkpointed: re-read from init_from).
    on_disk = {"params", "rest", "opt_state", "step", "rng", "skipped"}
    assert isinstance(as_dict, dict) and set(as_dict) == on_disk
    assert {f.name for f in dataclasses.fields(TrainState)} == {*as_dict, "frozen"}
    assert isinstance(typed, TrainState) and (int(typed.step), int(typed.skipped)) == (7, 2)
    jax.tree.map(np.testing.assert_array_equal, typed.as_dict(), as_dict)
    jax.tree.map(np.testing.assert_array_equal, typed, state)


# One writer, atomic files, metrics each step once ---------------------------------------------


def test_one_writer_per_run_directory(tmp_path):
    handle = run_dir.lock(tmp_path / "locked")
    try:
        with pytest.raises(RuntimeError, match="another process is training in"):
            _run(tmp_path, "locked", steps=1)
    finally:
        handle.release()


def test_metrics_log_is_rewritten_atomically_and_tolerates_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
    path.write_text(records + '{"step": 6, "lo')  # torn by a kill
    log = metrics.MetricsLog(tmp_path, start=3, tensorboard=False)
    log.close()
    assert [r["step"] for r in metrics.read(path)] == [1, 2, 3]
    assert not list(tmp_path.glob(".metrics.jsonl.tmp-*"))
    metrics.MetricsLog(tmp_path, start=0, tensorboard=False).close()  # a fresh start forgets old steps
    assert path.read_text() == ""
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics record"):
        metrics.MetricsLog(tmp_path, start=1, tensorboard=False)


def test_eval_rejects_zero_batches(finished_run):
    with pytest.raises(ValueError, match="batches=0 is invalid"):
        evaluate(finished_run[0], batches=0, progress=False)


# Signals and kills, in real processes ----------------------------------------------------------

_ARGS = [
    "--seq-len",
    "32",
    "--batch-size",
    "8",
    "--log-every",
    "1",
    "--eval-every",
    "1000",
    "--no-tensorboard",
]
_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _cmd(out, steps, every):
    return [
        sys.executable,
        "-m",
        "llmarch.cli",
        "train",
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--checkpoint-every",
        str(every),
        *_ARGS,
    ]


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal could be sent"


def _logged_steps(out):
    path = out / "metrics.jsonl"
    return [r["step"] for r in metrics.read(path) if "loss" in r] if path.exists() else []


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_step_it_stopped(tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen(
        _cmd(out, 1000, 1000), env=_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: len(_logged_steps(out)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = _logged_steps(out)[-1]
    assert Checkpointer(out / "checkpoints", save_every=1000, keep=3).steps() == [last]
    assert f"stopped by SIGTERM after step {last}" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_repeated_kill_9_still_gives_the_uninterrupted_result(tmp_path):
    """Killed mid-step, mid-save and mid-restart, then finished: bit-identical to one run, and
    every step logged exactly once."""
    steps, every = 12, 4
    subprocess.run(_cmd(tmp_path / "whole", steps, every), check=True, env=_ENV, capture_output=True)
    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    kill_points = [
        lambda: len(_logged_steps(out)) >= 3,  # mid-step, before any checkpoint
        lambda: ckpts.is_dir() and any(p.name.startswith("8") for p in ckpts.iterdir()),  # around a save
        lambda: (out / "metrics.jsonl").exists() and bool(_logged_steps(out)),  # right after a restart
    ]
    for when in kill_points:
        proc = subprocess.Popen(
            _cmd(out, steps, every), env=_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_for(when, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(_cmd(out, steps, every), check=True, env=_ENV, capture_output=True)

    def losses(run):
        return {r["step"]: r["loss"] for r in metrics.read(tmp_path / run / "metrics.jsonl") if "loss" in r}

    assert _logged_steps(out) == list(range(1, steps + 1))
    assert losses("killed") == losses("whole")
    finals = [restore_run(tmp_path / run)[2] for run in ("whole", "killed")]
    for a, b in zip(_leaves(finals[0]), _leaves(finals[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_tensorboard_points_are_on_disk_before_close(tmp_path):
    log = metrics.MetricsLog(tmp_path, tensorboard=True)
    log.log(1, {"a_distinctive_tag": 1.5})
    log.sync()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"a_distinctive_tag" in events[0].read_bytes()  # a kill -9 now loses nothing
    log.log(2, {"another_tag": 2.5})
    log.close()
    assert any(b"another_tag" in p.read_bytes() for p in (tmp_path / "tensorboard").glob("events.*"))


def test_paths_are_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("some text")
    cfg = TrainConfig(out_dir="runs/a", data="corpus.txt").resolved()
    assert cfg.out_dir == str(tmp_path / "runs" / "a") and cfg.data == str(tmp_path / "corpus.txt")
    assert TrainConfig(out_dir="x").resolved().data == "default"


def test_tensorboard_forgets_the_steps_a_resume_replays(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(trackers, "SummaryWriter", lambda logdir, **kw: opened.append(kw) or _NullWriter())
    metrics.MetricsLog(tmp_path, start=8, tensorboard=True).close()
    assert opened == [{"purge_step": 9}]


class _NullWriter:
    def add_scalar(self, *args):
        pass

    def close(self):
        pass


def test_readers_retry_when_the_trainer_rotates_a_step_away(finished_run, tmp_path, monkeypatch):
    import llmarch.train.evaluate as evaluate_mod

    run = _copy(finished_run, tmp_path)
    real, calls = evaluate_mod.latest_verified, []

    def racing(root, parse, **kw):  # the first look sees a step that the trainer then rotates away
        calls.append(root)
        if len(calls) == 1:
            (run / "checkpoints" / "6").mkdir()
            raise CheckpointError("checkpoint 2 has no manifest.json")
        return real(root, parse, **kw)

    monkeypatch.setattr(evaluate_mod, "latest_verified", racing)
    assert restore_run(run)[3] == 4 and len(calls) == 2

    def corrupted(root, parse, **kw):  # nothing moves: a real corruption is raised at once
        calls.append(root)
        raise CheckpointError("checkpoint 4 is corrupted")

    monkeypatch.setattr(evaluate_mod, "latest_verified", corrupted)
    with pytest.raises(CheckpointError, match="is corrupted"):
        restore_run(run)
    assert len(calls) == 3
