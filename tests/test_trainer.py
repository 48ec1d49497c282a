import json
from pathlib import Path

import jax
import numpy as np
import pytest

from llmarch import cli
from llmarch.train import metrics
from llmarch.train.checkpoint import CheckpointError
from llmarch.train.config import TrainConfig
from llmarch.train.evaluate import restore_run
from llmarch.train.optim import OPTIMIZERS, OptimizerConfig
from llmarch.train.trainer import train

SMALL = dict(
    seq_len=32, batch_size=8, eval_every=1000, eval_batches=2, log_every=1, progress=False, tensorboard=False
)


def _run(tmp_path, name="run", **changes):
    return train(TrainConfig(out_dir=str(tmp_path / name), **{**SMALL, **changes}), log=lambda s: None)


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_trains_logs_and_resumes_to_the_same_losses(tmp_path):
    full = _run(tmp_path, "full", steps=8, checkpoint_every=4, eval_every=4)
    assert full.losses[8] < full.losses[1]
    records = metrics.read(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert all("tokens_per_s" in r for r in records if "loss" in r and r["step"] > 1)
    # Resume from the checkpoint at step 4 (the later ones removed): the same losses and params.
    import shutil

    shutil.rmtree(tmp_path / "full" / "checkpoints" / "8")
    resumed = _run(tmp_path, "full", steps=8, checkpoint_every=4, eval_every=4)
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    assert all(resumed.losses[s] == full.losses[s] for s in resumed.losses)
    for a, b in zip(_leaves(resumed.params), _leaves(full.params), strict=True):
        np.testing.assert_array_equal(a, b)
    records = metrics.read(tmp_path / "full" / "metrics.jsonl")  # replayed steps not duplicated
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))


@pytest.mark.parametrize("spec, rules", [("data=8", "dp"), ("data=2,fsdp=4", "fsdp")])
def test_mesh_run_matches_one_device(devices, tmp_path, spec, rules):
    one = _run(tmp_path, "one", steps=4)
    sharded = _run(tmp_path, "mesh", steps=4, mesh=spec, rules=rules)
    np.testing.assert_allclose(list(sharded.losses.values()), list(one.losses.values()), rtol=2e-5)
    # Adam divides by sqrt(v): float32 reduction-order noise in near-zero gradients moves a few
    # parameters by ~lr·1e-2 after 4 steps; everything else agrees to ~1e-7.
    for a, b in zip(_leaves(sharded.params), _leaves(one.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains(tmp_path, name):
    lr = {"adadelta": 1.0, "adagrad": 0.05, "sgd": 0.5, "momentum": 0.1}.get(name, 3e-3)
    result = _run(
        tmp_path,
        steps=6,
        optimizer=OptimizerConfig(name=name, learning_rate=lr, weight_decay=0.01, schedule="constant"),
    )
    assert all(np.isfinite(list(result.losses.values())))
    assert result.losses[6] < result.losses[1], result.losses


def test_missing_runs_and_checkpoint_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        restore_run(tmp_path / "nowhere")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="no train_config.json"):
        restore_run(tmp_path / "empty_run")
    (tmp_path / "file_out").mkdir()
    (tmp_path / "file_out" / "checkpoints").write_text("not a directory")
    with pytest.raises(CheckpointError, match="not a directory"):
        _run(tmp_path, "file_out", steps=2)


def test_bad_configs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        _run(tmp_path, data=str(tmp_path / "empty"), steps=2)
    with pytest.raises(ValueError, match="seq_len=512 exceeds the model's max_seq_len=256"):
        TrainConfig(out_dir=str(tmp_path), seq_len=512)
    with pytest.raises(ValueError, match="name='lamb' is unknown"):
        OptimizerConfig(name="lamb")
    with pytest.raises(ValueError, match="nan_policy='ignore'"):
        TrainConfig(out_dir=str(tmp_path), nan_policy="ignore")
    with pytest.raises(ValueError, match="mesh axis 'model' is unknown"):
        TrainConfig(out_dir=str(tmp_path), mesh="model=2")


def test_cli_train_config_file_and_flags(tmp_path, capsys):
    config = tmp_path / "cfg.json"
    config.write_text(
        json.dumps(
            {
                "out_dir": str(tmp_path / "cli"),
                "steps": 2,
                "seq_len": 32,
                "batch_size": 4,
                "optimizer": {"name": "adam", "learning_rate": 1e-3},
            }
        )
    )
    assert (
        cli.main(["train", "--config", str(config), "--steps", "3", "--no-tensorboard", "--log-every", "1"])
        == 0
    )
    saved = json.loads((tmp_path / "cli" / "train_config.json").read_text())
    assert saved["steps"] == 3 and saved["optimizer"]["name"] == "adam" and saved["batch_size"] == 4
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "cli"), "--batches", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 3 and np.isfinite(report["loss"])
    assert cli.main(["train", "--out", str(tmp_path / "x"), "--optimizer", "lamb"]) == 2
    assert "name='lamb' is unknown" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_records_hold_lr_step_time_throughput_and_only_active_loss_terms(tmp_path):
    messages = []
    warmup = OptimizerConfig(learning_rate=1e-3, schedule="constant", warmup_steps=2)
    cfg = TrainConfig(out_dir=str(tmp_path / "plain"), steps=3, optimizer=warmup, **SMALL)
    train(cfg, log=messages.append)
    records = [r for r in metrics.read(tmp_path / "plain" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    # The step's own learning rate: warmup from 0 over 2 updates (step 1 applies update 0).
    np.testing.assert_allclose([r["learning_rate"] for r in records], [0.0, 5e-4, 1e-3], rtol=1e-6)
    assert all({"grad_norm", "skipped", "perplexity"} <= set(r) for r in records)
    assert "step_time" not in records[0] and "tokens_per_s" not in records[0]  # the compiling step
    for r in records[1:]:
        assert r["step_time"] > 0
        np.testing.assert_allclose(r["tokens_per_s"], 8 * 32 / r["step_time"], rtol=1e-9)
    assert not any("z_loss" in r or "aux_loss" in r for r in records)  # coefficient 0, no MoE
    assert messages[0].startswith("training tiny-dense (") and "on 1 cpu device:" in messages[0]
    assert messages[1].startswith("compiling the train step")
    assert f"wrote {(tmp_path / 'plain').resolve()}:" in messages  # the summary names each file
    assert f"  metrics      {(tmp_path / 'plain').resolve() / 'metrics.jsonl'}" in messages
    # With a z-loss coefficient and an MoE with a balance loss, both terms are logged.
    moe = TrainConfig(out_dir=str(tmp_path / "moe"), preset="tiny-moe", steps=2, z_loss=1e-4, **SMALL)
    train(moe, log=lambda s: None)
    records = [r for r in metrics.read(tmp_path / "moe" / "metrics.jsonl") if "loss" in r]
    assert all(r["z_loss"] > 0 and r["aux_loss"] > 0 for r in records)


def test_tensorboard_events_are_written(tmp_path):
    _run(tmp_path, "tb", steps=2, tensorboard=True)
    assert any(Path(tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
