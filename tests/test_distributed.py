"""Multi-process training on ``jax.distributed``: two ``llmarch train`` processes on 127.0.0.1, each
with 4 simulated CPU devices, train on one data=2,fsdp=4 mesh over all 8 devices exactly as one
process with 8 devices does, and a run stopped by a signal to one of them resumes exactly.

The processes are real ``python -m llmarch train`` subprocesses joined by ``--coordinator``,
``--num-processes`` and ``--process-id`` (cross-process collectives: gloo); every one has a
timeout, so a hang fails the test instead of hanging CI.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from llmarch.train import distributed

STEPS = 16  # the signal comes after step 2: 14 steps to spare on a fast machine
TIMEOUT_S = 600  # per launch: a tiny model, but compiling under gloo on a loaded 2-core CI machine
# One process reduces over its 8 devices in-process, two over gloo: the sums run in another order,
# so the losses agree to float32 rounding (observed: at most 3 ulp, 1.4e-6 on a loss of 5.4).
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(out, *flags):
    return [
        sys.executable,
        "-m",
        "llmarch",
        "train",
        "--out",
        str(out),
        "--preset",
        "tiny-dense",
        "--steps",
        str(STEPS),
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--mesh",
        "data=2,fsdp=4",
        "--log-every",
        "1",
        "--eval-every",
        "1000",
        "--eval-batches",
        "1",
        "--checkpoint-every",
        "4",
        "--keep-checkpoints",
        "2",
        "--no-tensorboard",
        "--progress",
        "false",
        *flags,
    ]


def _launch(out, data, cache, *, processes: int, logs) -> list[subprocess.Popen]:
    """``processes`` processes of one run (each with 8 / processes devices), stdout and stderr
    to ``logs/<out name>.<i>.log``."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}",
        "JAX_PLATFORMS": "cpu",
        "LLMARCH_COMPILE_CACHE": str(cache),  # the 2-process launches compile the same programs
        "PYTHONUNBUFFERED": "1",
    }
    flags = ["--data", str(data)]
    if processes > 1:
        flags += ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", str(processes)]
    procs = []
    for i in range(processes):
        log = open(logs / f"{out.name}.{i}.log", "w")  # noqa: SIM115 (closed with the process)
        process_flags = [*flags, "--process-id", str(i)] if processes > 1 else flags
        procs.append(
            subprocess.Popen(_command(out, *process_flags), env=env, stdout=log, stderr=subprocess.STDOUT)
        )
        procs[-1].log_path = log.name
    return procs


def _wait(procs, deadline: float) -> list[int]:
    """The exit codes; on a timeout every process is killed and the test fails with their logs."""
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"a training process hung past its timeout:\n{_tails(procs)}")
    return codes


def _tails(procs) -> str:
    return "\n".join(
        f"--- {p.log_path}:\n" + "\n".join(open(p.log_path).read().splitlines()[-15:]) for p in procs
    )


def _run(out, data, cache, *, processes, logs, expect=0) -> list[subprocess.Popen]:
    procs = _launch(out, data, cache, processes=processes, logs=logs)
    codes = _wait(procs, time.monotonic() + TIMEOUT_S)
    assert codes == [expect] * processes, _tails(procs)
    return procs


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(out) if "loss" in r}


def _last_logged(out) -> int:
    """The last step in ``out/metrics.jsonl`` while process 0 may be writing it (0: none yet)."""
    try:
        return max(_losses(out), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or a line half written
        return 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The run of one process with 8 devices and of two with 4 each (launched side by side)."""
    root = tmp_path_factory.mktemp("distributed")
    data = root / "corpus.txt"
    data.write_text(
        "".join(
            f"Line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 5}.\n" for i in range(600)
        )
    )
    logs = root / "logs"
    logs.mkdir()
    one = _launch(root / "one", data, "off", processes=1, logs=logs)
    two = _launch(root / "two", data, root / "cache2", processes=2, logs=logs)
    deadline = time.monotonic() + TIMEOUT_S
    codes = _wait(one + two, deadline)
    assert codes == [0, 0, 0], _tails(one + two)
    return {"root": root, "data": data, "logs": logs, "one": one, "two": two}


@pytest.mark.slow  # with the next test: 5 minutes on a loaded 2-core machine, 4 launches
def test_two_processes_train_like_one_process_of_eight_devices(runs):
    root = runs["root"]
    one, two = _losses(root / "one"), _losses(root / "two")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=RTOL, atol=0)
    val = [next(r["val_loss"] for r in _records(root / name) if "val_loss" in r) for name in ("one", "two")]
    np.testing.assert_allclose(val[1], val[0], rtol=RTOL)
    # Only process 0 reports; both saved their shards and their data iterator's position.
    p0, p1 = (open(p.log_path).read() for p in runs["two"])
    assert "finished at step" in p0 and "finished at step" not in p1
    assert "training tiny-dense" in p0 and "training tiny-dense" not in p1
    last = root / "two" / "checkpoints" / str(STEPS)
    assert sorted(p.name for p in (last / "data").glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    assert (last / "manifest.json").is_file()
    kept = sorted(int(p.name) for p in (root / "two" / "checkpoints").iterdir())
    assert kept == [STEPS - 4, STEPS]  # every 4 steps, keep 2: rotation ran on both processes


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_and_they_resume_exactly(runs):
    root, data, logs = runs["root"], runs["data"], runs["logs"]
    out = root / "stopped"
    procs = _launch(out, data, root / "cache2", processes=2, logs=logs)
    deadline = time.monotonic() + TIMEOUT_S
    while _last_logged(out) < 2:  # both processes are inside the training loop
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            _wait(procs, time.monotonic())  # kills what still runs if the deadline passed
            pytest.fail(f"the run ended or hung before step 2:\n{_tails(procs)}")
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)  # process 0 is never signalled: it must stop with process 1
    assert _wait(procs, deadline) == [128 + signal.SIGTERM] * 2, _tails(procs)
    p0, p1 = (open(p.log_path).read() for p in procs)
    assert "stopped by SIGTERM" in p1 and "stopped by a signal to another process" in p0
    saved = max(int(p.name) for p in (out / "checkpoints").iterdir())
    assert 2 <= saved < STEPS, f"the signal came after the run finished (step {saved})"
    assert max(_losses(out)) == saved  # both stopped after the same step, which was saved

    _run(out, data, root / "cache2", processes=2, logs=logs)  # the same command again
    assert "resumed from" in open(procs[0].log_path).read()
    resumed, uninterrupted = _losses(out), _losses(root / "two")
    assert resumed == uninterrupted  # exactly: the same programs on the same data in the same order


def test_launch_settings_are_checked_before_jax_starts():
    with pytest.raises(ValueError, match="--coordinator 'localhost' is invalid"):
        distributed.Launch(coordinator="localhost", num_processes=2, process_id=0)
    with pytest.raises(
        ValueError, match=r"--process-id 2 is invalid: it must be in \[0, --num-processes 2\)"
    ):
        distributed.Launch(coordinator="127.0.0.1:1234", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="--num-processes 0 is invalid"):
        distributed.Launch(num_processes=0)
    with pytest.raises(ValueError, match="--num-processes '2' is invalid: it must be an integer"):
        distributed.Launch(num_processes="2")
    with pytest.raises(ValueError, match="--process-id True is invalid"):
        distributed.Launch(process_id=True)
    assert distributed.Launch(coordinator="[::1]:80").coordinator == "[::1]:80"
    assert not distributed.Launch().given
    # No flags and no launcher's environment (or detection off): one process, nothing started.
    assert not distributed.start(distributed.Launch(detect=False))
    if distributed.detected_launcher() is None:
        with pytest.raises(ValueError, match="--coordinator, --process-id not given and no launcher"):
            distributed.start(distributed.Launch(num_processes=2))


def test_a_kubernetes_pod_is_not_taken_for_a_multi_process_launch(monkeypatch):
    """jax's Kubernetes detector fires in any pod (hosted notebooks, CI runners): a one-process
    `llmarch train` there must stay one process, not warn or bootstrap across pods."""
    if (other := distributed.detected_launcher()) is not None:
        pytest.skip(f"this machine has a {other} environment")
    # A pod with the `kubernetes` package, as jax's K8sCluster detector sees one.
    api = lambda *a, **k: types.SimpleNamespace()  # noqa: E731
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(load_incluster_config=lambda: None),
        client=types.SimpleNamespace(
            CoreV1Api=api, BatchV1Api=api, exceptions=types.SimpleNamespace(ApiException=Exception)
        ),
    )
    monkeypatch.setitem(sys.modules, "kubernetes", fake)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert distributed.detected_launcher() is None
    assert not distributed.start(distributed.Launch())


def test_bad_launch_flags_are_one_line_errors(tmp_path, capsys):
    from llmarch import cli

    code = cli.main(["train", "--out", str(tmp_path / "r"), "--coordinator", "host", "--num-processes", "2"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "llmarch train: error: --coordinator 'host' is invalid: give HOST:PORT (process 0's address and "
        "a free port, the same on every process), e.g. 10.0.0.1:1234"
    )
    assert not (tmp_path / "r").exists()


class _Rows:
    """A stand-in sharding whose addressable devices hold the given row slices of the batch."""

    def __init__(self, *rows):
        self.rows = rows

    def addressable_devices_indices_map(self, shape):
        return {i: (slice(a, b), slice(None)) for i, (a, b) in enumerate(self.rows)}


def test_each_process_feeds_the_contiguous_block_its_devices_hold():
    assert distributed.process_rows(_Rows((0, 2), (2, 4)), 8, 32) == (0, 2)
    assert distributed.process_rows(_Rows((6, 8), (4, 6)), 8, 32) == (1, 2)
    assert distributed.process_rows(_Rows((0, 8), (0, 8)), 8, 32) == (0, 1)  # replicated: all rows
    with pytest.raises(ValueError, match="not one contiguous block of the 8 rows"):
        distributed.process_rows(_Rows((0, 2), (4, 6)), 8, 32)
