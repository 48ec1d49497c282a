"""Quantized checkpoints: save/load round trip, ``llmarch quantize`` on a run, ``eval`` and
``generate`` on the result, and one-line errors for bad requests."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch.cli import main
from llmarch.quant import QuantConfig, quantize
from llmarch.quant.checkpoint import QUANT_CONFIG, WEIGHTS, load_quantized, save_quantized


@pytest.mark.parametrize(
    "name,qcfg",
    [
        ("tiny-moe", QuantConfig(bits=4, group_size=32, symmetric=False, include_lm_head=True)),
        ("tiny-mla", QuantConfig(method="fp8", fp8_block=32)),
        ("tiny-gqa", QuantConfig(bits=3, group_size=32, include_embeddings=True)),
    ],
)
def test_save_load_round_trip(tmp_path, name, qcfg):
    cfg = llmarch.presets.get(name)
    qmodel = quantize(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)), cfg, qcfg, progress=False)
    save_quantized(qmodel, cfg, tmp_path, tokenizer="byte", source="test")
    record = json.loads((tmp_path / QUANT_CONFIG).read_text())
    assert QuantConfig.from_json(json.dumps(record["quant"])) == qcfg and record["source"] == "test"
    loaded, cfg2, tokenizer = load_quantized(tmp_path)
    assert cfg2 == cfg and loaded.quant_config == qcfg and tokenizer is not None
    want = jax.tree.leaves(nnx.state(qmodel))
    got = jax.tree.leaves(nnx.state(loaded))
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    tokens = jnp.arange(10, dtype=jnp.int32)[None] % cfg.vocab_size
    graphdef, state = nnx.split(qmodel)
    forward = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens))
    np.testing.assert_array_equal(np.asarray(forward(nnx.state(loaded))), np.asarray(forward(state)))


def test_load_names_a_mismatching_variable(tmp_path):
    cfg = llmarch.presets.get("tiny-dense")
    qmodel = quantize(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)), cfg, QuantConfig(bits=8), progress=False)
    save_quantized(qmodel, cfg, tmp_path)
    record = json.loads((tmp_path / QUANT_CONFIG).read_text())
    record["quant"]["bits"] = 4  # the file holds int8 weights, the config now says int4
    (tmp_path / QUANT_CONFIG).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"model.safetensors: '.*/q' is int8\[.*\], expected uint8"):
        load_quantized(tmp_path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    args = ["train", "--out", str(out), "--preset", "tiny-dense", "--steps", "2", "--seq-len", "32"]
    assert main([*args, "--batch-size", "4", "--no-tensorboard", "--no-compile-cache"]) == 0
    return out


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_quantize_eval_generate_on_a_run(run, tmp_path, capsys):
    out = tmp_path / "w4"
    argv = ["quantize", "--checkpoint", str(run), "--method", "rtn", "--bits", "4", "--group-size", "32"]
    assert main([*argv, "--out", str(out), "--no-compile-cache"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bytes"] == (out / WEIGHTS).stat().st_size and summary["bytes"] < summary["float32_bytes"]
    assert main(["eval", "--checkpoint", str(out), "--batches", "2", "--no-compile-cache"]) == 0
    quantized = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(run), "--batches", "2", "--no-compile-cache"]) == 0
    original = json.loads(capsys.readouterr().out)
    assert quantized["quant"]["bits"] == 4 and quantized["data"] == original["data"]
    assert abs(quantized["loss"] - original["loss"]) < 0.05 * original["loss"]
    gen = [
        "generate",
        "--checkpoint",
        str(out),
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
    ]
    assert main([*gen, "--no-compile-cache"]) == 0
    assert "(length)" in capsys.readouterr().out
    # a quantized checkpoint is not quantized again
    err = _error(
        capsys, ["quantize", "--checkpoint", str(out), "--method", "rtn", "--out", str(tmp_path / "x")]
    )
    assert "already quantized" in err


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_quantize_on_a_run(run, tmp_path, capsys, method):
    """GPTQ and AWQ calibrate on the run's own training data through the CLI; the result
    evaluates as a run does and records its method."""
    out = tmp_path / method
    argv = ["quantize", "--checkpoint", str(run), "--method", method, "--bits", "4", "--group-size", "32"]
    assert main([*argv, "--calibration-samples", "8", "--out", str(out), "--no-compile-cache"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == method and summary["bytes"] < summary["float32_bytes"]
    assert main(["eval", "--checkpoint", str(out), "--batches", "2", "--no-compile-cache"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quant"]["method"] == method and np.isfinite(result["loss"])


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--method", "hqq"], "QuantConfig.method='hqq' is invalid"),
        (["--method", "rtn", "--bits", "2"], "QuantConfig.bits=2 is invalid"),
        (["--method", "rtn", "--bits", "4", "--group-size", "48"], "QuantConfig.group_size=48 is invalid"),
        (
            ["--method", "rtn", "--bits", "4", "--group-size", "128"],
            "group_size=128 does not divide the input",
        ),
        (["--method", "gptq", "--calibration-samples", "100000"], "calibration data .* is too short"),
        (["--method", "rtn", "--calibration-data", "x.txt"], "--calibration-data applies to"),
    ],
)
def test_quantize_errors_are_one_line(run, tmp_path, capsys, extra, match):
    err = _error(capsys, ["quantize", "--checkpoint", str(run), "--out", str(tmp_path / "q"), *extra])
    assert err.startswith("llmarch quantize: error:") and re.search(match, err), err
