"""The command line's config system (``llmarch.cli_config``, ``llmarch.cli_train``): a flag for every
field, nested by dotted paths, over a YAML or JSON ``--config``; ``--help`` with defaults, types
and choices; one-line errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from llmarch import cli, cli_config, presets
from llmarch.cli_train import train_config
from llmarch.demo_config import DemoConfig
from llmarch.train.optim import LrGroup

_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "LLMARCH_COMPILE_CACHE": "off"}


@pytest.fixture(scope="module")
def parser():
    return cli.build_parser()


def _cfg(parser, *argv):
    return train_config(parser.parse_args(["train", *argv]))


def _one_line_exit(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_train_from_a_yaml_file_with_nested_overrides_and_flags(tmp_path):
    """The done-when of the config system: `llmarch train` in a subprocess, YAML + dotted flags."""
    (tmp_path / "run.yaml").write_text(
        f"""out_dir: {tmp_path / "run"}
preset: tiny-dense
steps: 2
seq_len: 16
batch_size: 2
eval_every: 2
eval_batches: 1
tensorboard: false
progress: false
model:                # partial: the rest is the preset's
  vocab_size: 300
  attention:
    num_kv_heads: 2
optimizer:
  name: sgd
  learning_rate: 1e-2   # YAML 1.1 reads this as a string; the float field takes it as a number
"""
    )
    flags = ["--model.num-layers", "1", "--optimizer.nesterov", "true", "--optimizer.momentum", "0.5"]
    flags += ["--steps", "3", "--seq_len", "8"]  # flags beat the file; underscores work too
    cmd = [sys.executable, "-m", "llmarch", "train", "--config", str(tmp_path / "run.yaml"), *flags]
    done = subprocess.run(cmd, env=_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["steps"], saved["seq_len"], saved["batch_size"]) == (3, 8, 2)
    preset = presets.get("tiny-dense")
    model = preset.replace(
        vocab_size=300, num_layers=1, attention=dataclasses.replace(preset.attention, num_kv_heads=2)
    )
    assert saved["model"] == json.loads(model.to_json())
    optimizer = saved["optimizer"]
    assert (optimizer["name"], optimizer["learning_rate"], optimizer["nesterov"]) == ("sgd", 1e-2, True)
    assert optimizer["momentum"] == 0.5 and saved["tensorboard"] is False
    # A value of the wrong type: one line naming the flag and the field, status 2, no traceback.
    bad = subprocess.run(
        [sys.executable, "-m", "llmarch", "train", "--out", str(tmp_path / "x"), "--model.d-model", "wide"],
        env=_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith(
        "llmarch train: error: argument --model.d-model (ModelConfig.d_model): 'wide' is invalid: "
        "must be an integer"
    )
    assert not (tmp_path / "x").exists()


def test_help_shows_every_field_with_its_type_default_and_choices(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapped lines
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in (
        "--steps INT training steps (default: 300)",
        "--out-dir STR, --out STR",
        "--mesh STR|null",
        "--nan-policy STR skip or stop on a non-finite step; one of: skip, stop (default: skip)",
        "--tensorboard [BOOL], --no-tensorboard",
        "--model.d-model INT D (default: the preset's)",
        "--model.attention.num-kv-heads INT",
        "--optimizer.learning-rate FLOAT|null, --lr FLOAT|null peak learning rate (default: null)",
        "--optimizer.nesterov [BOOL], --optimizer.no-nesterov",
        "--optimizer.rho FLOAT|null adadelta (default: null)",
        "--distill.temperature FLOAT",
    ):
        assert expected in text, expected
    assert "--model.d_model" not in text  # the underscored spelling works but is not listed twice
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--out-dir STR|null, --out STR|null" in text and "--learning-rate FLOAT, --lr FLOAT" in text
    assert "--steps INT training steps (default: 300)" in text and "one of: tiny-dense" in text
    assert "--prompt STR (default: 'The ')" in text


def test_wrong_types_and_values_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "o")
    for flags, message in [
        (["--steps", "abc"], "argument --steps (TrainConfig.steps): 'abc' is invalid: must be an integer"),
        (["--steps", "true"], "'true' is invalid: must be an integer"),
        (
            ["--lr", "fast"],
            "--lr (OptimizerConfig.learning_rate): 'fast' is invalid: must be a number or null",
        ),
        (["--optimizer.nesterov", "maybe"], "must be true or false"),
        (
            ["--no-tensorboard", "false"],
            "argument --no-tensorboard (TrainConfig.tensorboard): takes no value",
        ),
        (["--model.blocks", "[{ffn: "], "must be YAML for"),
        (
            ["--model.d-modle", "3"],
            "unrecognized arguments: --model.d-modle 3 (did you mean --model.d-model?)",
        ),
    ]:
        err = _one_line_exit(capsys, ["train", "--out", out, *flags])
        assert err.startswith("llmarch train: error: ") and message in err, err
    # Values of the right type that a config refuses: its own check, also one line (status 2).
    for flags, message in [
        (["--optimizer.name", "lamb"], "OptimizerConfig.name='lamb' is unknown"),
        (["--optimizer.rho", "0.9"], "OptimizerConfig.rho=0.9 is invalid: adamw does not use it"),
        (["--model.attention.num-kv-heads", "3"], "AttentionConfig.num_kv_heads=3 is invalid"),
        (["--distill.loss", "jsd"], "TrainConfig.distill is missing the required fields ['teacher']"),
    ]:
        assert cli.main(["train", "--out", out, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()
    err = _one_line_exit(capsys, ["eval"])  # every command's argparse errors are one line too
    assert err == "llmarch eval: error: the following arguments are required: --checkpoint"


def test_a_partial_model_override_starts_from_the_preset(parser, tmp_path):
    out = str(tmp_path / "o")
    cfg = _cfg(parser, "--out", out, "--preset", "tiny-moe", "--model.vocab_size", "1000")
    assert cfg.model == presets.get("tiny-moe").replace(vocab_size=1000)
    assert cfg.preset == "tiny-moe"
    assert _cfg(parser, "--out", out, "--preset", "tiny-moe").model is None  # no override: the preset
    # A `model` in the file without ModelConfig's required fields is completed from the preset too;
    # a section that was null (rope_scaling) starts from its class defaults.
    (tmp_path / "c.json").write_text(json.dumps({"out_dir": out, "model": {"d_model": 96}}))
    cfg = _cfg(parser, "--config", str(tmp_path / "c.json"), "--model.attention.rope-scaling.factor", "4")
    dense = presets.get("tiny-dense")
    assert cfg.model.d_model == 96 and cfg.model.num_layers == dense.num_layers
    assert cfg.model.attention.rope_scaling.factor == 4.0
    assert cfg.model.attention.rope_scaling.low_freq_factor == 1.0


def test_flags_take_yaml_values_bare_bools_nulls_and_sections(parser, tmp_path):
    out = str(tmp_path / "o")
    cfg = _cfg(
        parser,
        *("--out-dir", out, "--optimizer", "sgd", "--optimizer.nesterov", "--optimizer.momentum", "0.9"),
        *("--loss-chunk", "null", "--tensorboard", "false", "--no-progress", "--mesh", "~"),
        *("--optimizer.lr-groups", "[{pattern: embed, multiplier: 2}]", "--data", "2024"),
        *("--distill.teacher", "t", "--distill.alpha", "0.5"),
    )
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.nesterov is True and cfg.optimizer.momentum == 0.9
    assert cfg.loss_chunk is None and cfg.tensorboard is False and cfg.progress is False
    assert cfg.mesh is None and cfg.data == "2024"  # a string field keeps the text
    assert cfg.optimizer.lr_groups == (LrGroup("embed", 2.0),)
    assert cfg.distill.teacher == "t" and cfg.distill.alpha == 0.5 and cfg.distill.loss == "forward_kl"


def test_precedence_file_then_stored_run_then_flags(parser, tmp_path):
    run = tmp_path / "run"
    (tmp_path / "c.json").write_text(json.dumps({"out_dir": str(run), "steps": 5, "seed": 3}))
    cfg = _cfg(parser, "--config", str(tmp_path / "c.json"), "--steps", "7")
    assert (cfg.steps, cfg.seed) == (7, 3)
    run.mkdir()
    (run / "train_config.json").write_text(cfg.to_json())  # as a run stores it
    cfg = _cfg(parser, "--out", str(run), "--optimizer.warmup-steps", "2")
    assert (cfg.steps, cfg.seed, cfg.optimizer.warmup_steps) == (7, 3, 2)


def test_demo_and_distill_share_train_names(parser):
    args = parser.parse_args(["demo", "--out", "d", "--lr", "0.01", "--max-tokens", "5", "--steps", "9"])
    paths = [f.path for f in cli_config.walk(DemoConfig)[0]]
    assert DemoConfig(**cli_config.given(args, paths)) == DemoConfig(
        out_dir="d", learning_rate=0.01, sample_tokens=5, steps=9
    )
    args = parser.parse_args(["demo", "--out-dir", "d", "--learning-rate", "0.5"])  # the older names
    assert cli_config.given(args, paths) == {"out_dir": "d", "learning_rate": 0.5}
    with pytest.raises(ValueError, match="DemoConfig.preset='llama3-8b' is invalid"):
        DemoConfig(preset="llama3-8b")
    args = parser.parse_args(
        ["distill", "--teacher", "t", "--student-preset", "tiny-gqa", "--alpha", "0.3", "--lr", "1e-3"]
    )
    assert vars(args)["distill.teacher"] == "t" and vars(args)["distill.alpha"] == 0.3
    assert args.preset == "tiny-gqa" and vars(args)["optimizer.learning_rate"] == 1e-3
    with pytest.raises(SystemExit):  # distill names its student --student-preset or --student
        parser.parse_args(["distill", "--preset", "tiny-gqa"])


def test_a_field_added_to_a_config_gets_its_flag():
    """Nothing but the dataclass: the flag, its help from the Attributes docstring, nesting."""

    @dataclasses.dataclass(frozen=True)
    class Inner:
        """A block.

        Attributes:
          width, depth: the block's shape,
            in units.
        """

        width: int = 4
        depth: int | None = None

    @dataclasses.dataclass(frozen=True)
    class Outer:
        name: str
        inner: Inner | None = None
        flags: tuple[int, ...] = (1,)

    parser = cli_config.OneLineParser(prog="t", formatter_class=cli_config.HelpFormatter)
    cli_config.add_flags(parser, Outer)
    args = parser.parse_args(["--name", "a", "--inner.depth", "3", "--flags", "[2, 3]"])
    flags, sections = cli_config.walk(Outer)
    given = cli_config.given(args, [f.path for f in flags])
    assert given == {"name": "a", "inner.depth": 3, "flags": [2, 3]}
    assert cli_config.merge({}, given) == {"name": "a", "inner": {"depth": 3}, "flags": [2, 3]}
    assert sections == {"inner": Inner}
    text = " ".join(parser.format_help().split())
    assert "--inner.width INT the block's shape, in units (default: 4)" in text
    assert "--name STR (default: none: required)" in text
