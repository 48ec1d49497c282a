"""The CLI's persistent compilation cache: on by default, in a directory the user can choose or
turn off, and a second run of the same shapes is served from it (it compiles nothing new)."""

import argparse
import os
import subprocess
import sys

import pytest

from llmarch import cli


def _args(**kw):
    return argparse.Namespace(command="train", **kw)


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.delenv(cli.COMPILE_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.compile_cache_dir(_args()) == tmp_path / "xdg" / "llmarch" / "jax"  # the default
    monkeypatch.setenv(cli.COMPILE_CACHE_ENV, str(tmp_path / "env"))
    assert cli.compile_cache_dir(_args()) == tmp_path / "env"
    assert cli.compile_cache_dir(_args(compile_cache=str(tmp_path / "flag"))) == tmp_path / "flag"
    assert cli.compile_cache_dir(_args(compile_cache=False)) is None  # --no-compile-cache
    monkeypatch.setenv(cli.COMPILE_CACHE_ENV, "off")
    assert cli.compile_cache_dir(_args()) is None


def test_an_unusable_cache_directory_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli.main(["presets", "--compile-cache", str(blocker / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmarch presets: error: --compile-cache ")
    with pytest.raises(SystemExit):  # argparse: the two flags exclude each other
        cli.build_parser().parse_args(["presets", "--compile-cache", "x", "--no-compile-cache"])


def _train(out, cache, *flags):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", cli.COMPILE_CACHE_ENV: str(cache)}
    cmd = [sys.executable, "-m", "llmarch.cli", "train", "--out", str(out), "--steps", "2", "--seq-len", "32"]
    cmd += ["--batch-size", "4", "--eval-every", "1000", "--no-tensorboard", *flags]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)


@pytest.mark.slow
def test_a_second_run_is_served_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    _train(tmp_path / "first", cache)
    entries = set(os.listdir(cache))
    assert entries  # the first run wrote its compiled programs
    _train(tmp_path / "second", cache)
    assert set(os.listdir(cache)) == entries  # every program of the second run was a cache hit
    _train(tmp_path / "third", tmp_path / "unused", "--no-compile-cache")
    assert not (tmp_path / "unused").exists()
