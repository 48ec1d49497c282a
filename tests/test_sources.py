"""Checkpoints as starting points: `llmarch prune` writing a run that eval/generate/Engine read,
pruned weights staying zero through fine-tuning (init_from and the run's own resumption),
fine-tuning from a Hugging Face directory, structured pruning through the CLI, and the errors."""

import json

import numpy as np
import pytest
from flax import nnx

from llmarch import hf, sources
from llmarch.cli import main
from llmarch.evaluation import evaluate
from llmarch.prune import sparsity
from llmarch.train.config import TrainConfig
from llmarch.train.evaluate import restore_run
from llmarch.train.trainer import train

QUIET = dict(progress=False, tensorboard=False)


def _cfg(out, **fields):
    base = dict(out_dir=str(out), preset="tiny-dense", seq_len=32, batch_size=4, steps=6, eval_every=6)
    return TrainConfig(**{**base, "checkpoint_every": 6, "eval_batches": 2, **QUIET, **fields})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("sources") / "base"
    sources.train(_cfg(out, steps=10, eval_every=10, checkpoint_every=10), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def pruned(base):
    out = base.parent / "pruned"
    args = ["prune", "--checkpoint", str(base), "--method", "wanda", "--sparsity", "0.5"]
    assert main([*args, "--calibration-samples", "8", "--out", str(out)]) == 0
    return out


def _model(run):
    cfg, graphdef, state, step = restore_run(run, log=lambda s: None)
    return nnx.merge(graphdef, state.params, state.rest), cfg, step


def test_prune_writes_a_run_that_readers_use(pruned, capsys):
    model, cfg, step = _model(pruned)
    assert step == 0 and cfg.keep_sparsity is True
    reached = sparsity(model, model.cfg)
    assert reached["total"] == pytest.approx(0.5)
    derived = json.loads((pruned / sources.DERIVED_FILE).read_text())
    assert derived["how"]["prune"]["method"] == "wanda" and derived["report"]["sparsity"] == reached
    assert np.isfinite(evaluate(pruned, batches=2, progress=False)["loss"])
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(pruned), "--prompt", "The", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_pruned_weights_stay_zero_through_fine_tuning(pruned, tmp_path):
    before, _, _ = _model(pruned)
    result = sources.train(_cfg(tmp_path / "ft", init_from=str(pruned)), log=lambda s: None)
    after = result.model()
    saved = json.loads((tmp_path / "ft" / "train_config.json").read_text())
    assert saved["keep_sparsity"] is True  # inherited from the pruned run
    changed = 0
    for (path, old), (_, new) in zip(
        nnx.to_flat_state(nnx.state(before, nnx.Param)),
        nnx.to_flat_state(nnx.state(after, nnx.Param)),
        strict=True,
    ):
        old, new = np.asarray(old.get_value()), np.asarray(new.get_value())
        if old.ndim >= 2:
            assert np.all(new[old == 0] == 0), path
        changed += int(np.any(old != new))
    assert changed > 0  # it did train
    assert sparsity(after, after.cfg)["total"] == pytest.approx(0.5)
    # switched off, the zeros move
    free = sources.train(
        _cfg(tmp_path / "free", init_from=str(pruned), keep_sparsity=False), log=lambda s: None
    )
    assert sparsity(free.model(), free.model().cfg)["total"] < 0.01


def test_a_pruned_run_resumes_as_a_recovery_fine_tune(base, tmp_path):
    out = tmp_path / "pruned"
    args = ["prune", "--checkpoint", str(base), "--sparsity", "0.6", "--scope", "global", "--out", str(out)]
    assert main(args) == 0
    assert main(["train", "--out", str(out), "--steps", "3", "--eval-every", "3", "--no-tensorboard"]) == 0
    model, cfg, step = _model(out)
    assert step == 3 and sparsity(model, model.cfg)["total"] == pytest.approx(0.6, abs=0.01)


def test_fine_tune_from_a_hugging_face_directory(base, tmp_path, capsys):
    model, _, _ = _model(base)
    hf.save_pretrained(model, model.cfg, tmp_path / "hf")
    with pytest.raises(ValueError, match="TrainConfig.tokenizer='byte' is not the tokenizer of init_from"):
        sources.train(_cfg(tmp_path / "x", init_from=str(tmp_path / "hf")))  # it ships no tokenizer
    assert not (tmp_path / "x").exists()
    out = tmp_path / "ft"
    assert main(["train", "--init-from", str(tmp_path / "hf"), "--out", str(out), "--steps", "2"]) == 2
    assert "is not the tokenizer of init_from" in capsys.readouterr().err


def test_init_from_errors(base, tmp_path):
    from llmarch import presets

    with pytest.raises(ValueError, match="TrainConfig.model differs from the model of init_from"):
        sources.train(_cfg(tmp_path / "a", init_from=str(base), model=presets.get("tiny-gqa")))
    with pytest.raises(FileNotFoundError, match="TrainConfig.init_from directory"):
        sources.train(_cfg(tmp_path / "b", init_from=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="needs its weights: train through llmarch.sources.train"):
        train(_cfg(tmp_path / "c", init_from=str(base)))
    with pytest.raises(ValueError, match="TrainConfig.init_from='' is invalid"):
        _cfg(tmp_path / "d", init_from="")


def test_prune_cli_errors(base, pruned, tmp_path, capsys):
    out = str(tmp_path / "p")
    cases = [
        (["--sparsity", "1.0"], "PruneConfig.sparsity=1.0 is invalid: must be in [0, 1)"),
        (["--sparsity", "-0.1"], "PruneConfig.sparsity=-0.1 is invalid"),
        (["--pattern", "2:4", "--sparsity", "0.3"], "must be 0.5 with pattern '2:4'"),
        (["--pattern", "3:4"], "PruneConfig.pattern='3:4' is invalid"),
        (["--method", "obs"], "PruneConfig.method='obs' is invalid"),
        (["--calibration-data", "x.txt"], "--calibration-data applies to wanda and sparsegpt"),
        (["--structured", "heads", "--pattern", "2:4"], "--pattern 2:4 applies to unstructured pruning"),
        (["--structured", "layers"], "layers"),
    ]
    for extra, message in cases:
        assert main(["prune", "--checkpoint", str(base), *extra, "--out", out]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert main(["prune", "--checkpoint", str(base), "--out", str(pruned)]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_structured_prune_cli_shrinks_the_model(base, tmp_path, capsys):
    out = tmp_path / "heads"
    args = ["prune", "--checkpoint", str(base), "--structured", "heads", "--sparsity", "0.5"]
    assert main([*args, "--calibration-samples", "8", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    model, cfg, _ = _model(out)
    assert model.cfg.attention.num_heads == 2 and summary["params_removed"] > 0
    derived = json.loads((out / sources.DERIVED_FILE).read_text())
    assert derived["report"]["config_changes"]["attention.num_heads"] == [4, 2]
    assert cfg.keep_sparsity is False
    assert np.isfinite(evaluate(out, batches=2, progress=False)["loss"])


def test_lowrank_cli_writes_a_factorized_run(base, tmp_path, capsys):
    from llmarch import accounting

    out = tmp_path / "svd"
    assert main(["lowrank", "--checkpoint", str(base), "--param-ratio", "0.5", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    model, cfg, _ = _model(out)
    assert model.cfg.low_rank and summary["params"] == accounting.param_count(model.cfg)
    assert summary["param_ratio"] < 0.8
    count = sum(int(np.size(v.get_value())) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert count == summary["params"]
    assert np.isfinite(evaluate(out, batches=2, progress=False)["loss"])
    # the factors fine-tune: the run resumes from its step 0 with its own settings
    assert main(["train", "--out", str(out), "--steps", "2", "--eval-every", "2", "--no-tensorboard"]) == 0
    assert _model(out)[2] == 2
    aware = tmp_path / "aware"
    args = ["lowrank", "--checkpoint", str(base), "--energy", "0.9", "--activation-aware"]
    assert main([*args, "--calibration-samples", "8", "--out", str(aware)]) == 0
    capsys.readouterr()
    derived = json.loads((aware / sources.DERIVED_FILE).read_text())
    assert derived["how"]["lowrank"]["activation_aware"] and derived["report"]["ranks"]
    cases = [
        (["--param-ratio", "1.5"], "LowRankConfig.param_ratio=1.5 is invalid: must be in (0, 1]"),
        (["--energy", "0"], "LowRankConfig.energy=0.0 is invalid"),
        (["--energy", "0.9", "--calibration-data", "x"], "--calibration-data applies to --activation-aware"),
        (["--energy", "0.9", "--scaling", "asvd"], "--scaling asvd applies with --activation-aware only"),
    ]
    for extra, message in cases:
        assert main(["lowrank", "--checkpoint", str(base), *extra, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "x").exists()
