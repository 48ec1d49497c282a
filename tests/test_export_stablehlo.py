"""StableHLO export (``llmarch.export.stablehlo``): the prefill and decode steps reloaded in a fresh
Python process that never imports llmarch (only the standalone loader copied into the export
directory, jax and safetensors) give llmarch's logits and greedy tokens; a multi-platform export
(cpu, cuda, tpu lowered on this CPU) runs the same; the manifest and weights describe the model;
bad arguments are refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import llmarch
from llmarch.inference.generate import generate

pytest.importorskip("flatbuffers")  # jax.export's serialization needs it
from llmarch.export.stablehlo import export_stablehlo  # noqa: E402
from llmarch.export.stablehlo_loader import load_stablehlo  # noqa: E402

# Two rows of different lengths: the first is padded in the prefill buffer of 8.
PROMPTS = [[72, 101, 108, 108, 111], [87, 111, 114, 108, 100, 33, 10, 65]]
STEPS = 6

# Runs in a fresh interpreter: the loader from the export directory, nothing from llmarch.
FRESH = """
import json, sys
import numpy as np
out_dir, prompts, steps, logits_file = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, out_dir)
import stablehlo_loader

m = stablehlo_loader.load_stablehlo(out_dir)
tokens = np.zeros((m.batch, m.prefill_len), np.int32)
for row, p in enumerate(prompts):
    tokens[row, : len(p)] = p
positions = np.array([len(p) for p in prompts], np.int32)
logits, cache = m.prefill(tokens, positions)
steps_logits, new = [np.asarray(logits)], [np.asarray(logits).argmax(-1).astype(np.int32)]
for _ in range(steps - 1):
    logits, cache = m.decode(new[-1], positions, cache)
    positions = positions + 1
    steps_logits.append(np.asarray(logits))
    new.append(steps_logits[-1].argmax(-1).astype(np.int32))
np.save(logits_file, np.stack(steps_logits, axis=1))
print(json.dumps({
    "tokens": np.stack(new, axis=1).tolist(),
    "generate": m.generate(prompts, steps),
    "llmarch_modules": sorted(k for k in sys.modules if k == "llmarch" or k.startswith("llmarch.")),
}))
"""


@pytest.fixture(scope="module")
def model():
    cfg = llmarch.presets.get("tiny-gqa")  # GQA 4/2 heads, RoPE, SwiGLU, 2 layers
    return llmarch.Transformer(cfg, rngs=nnx.Rngs(0)), cfg


@pytest.fixture(scope="module")
def reference(model):
    """llmarch in process: each row's greedy tokens (``generate``, its own KV-cache steps) and the
    logits that chose them (one full forward pass over the finished sequence)."""
    m, _ = model
    tokens, logits = [], []
    for p in PROMPTS:
        seq = generate(m, np.asarray([p]), STEPS)[0]
        full = np.asarray(m(seq[None]))[0]  # [len(p) + STEPS, V]
        tokens.append(seq[len(p) :].tolist())
        logits.append(full[len(p) - 1 : len(p) - 1 + STEPS])
    return tokens, np.stack(logits)  # [B, STEPS, V]


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    m, cfg = model
    return export_stablehlo(
        m, cfg, tmp_path_factory.mktemp("shlo") / "out", batch=2, max_len=24, prefill_len=8
    )


def test_fresh_process_without_llmarch_gives_llmarch_logits_and_tokens(exported, reference, tmp_path):
    script = tmp_path / "run_exported.py"
    script.write_text(FRESH)
    logits_file = tmp_path / "logits.npy"
    args = [sys.executable, str(script), str(exported), json.dumps(PROMPTS), str(STEPS), str(logits_file)]
    done = subprocess.run(
        args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["llmarch_modules"] == []
    tokens, logits = reference
    assert result["tokens"] == tokens
    assert result["generate"] == tokens
    np.testing.assert_allclose(np.load(logits_file), logits, atol=2e-5, rtol=1e-5)


def test_manifest_and_weights_describe_the_model(model, exported):
    m, cfg = model
    manifest = json.loads((exported / "manifest.json").read_text())
    state = {".".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(nnx.state(m))}
    assert {p["name"] for p in manifest["params"]} == set(state)
    weights = load_file(exported / manifest["weights"])
    for p in manifest["params"]:
        np.testing.assert_array_equal(weights[p["name"]], np.asarray(state[p["name"]]))
        assert p["shape"] == list(state[p["name"]].shape) and p["dtype"] == "float32"
    a = cfg.attention
    assert manifest["cache"] == [
        {"name": f"0.{kv}", "shape": [cfg.num_layers, 2, 24, a.num_kv_heads, a.head_dim], "dtype": "float32"}
        for kv in ("k", "v")
    ]
    assert (manifest["batch"], manifest["prefill_len"], manifest["max_len"]) == (2, 8, 24)
    assert manifest["platforms"] == ["cpu"] and manifest["vocab_size"] == cfg.vocab_size
    decode = manifest["functions"]["decode"]
    names = sorted(state)
    assert decode["flat_inputs"] == [f"params/{n}" for n in names] + [
        "tokens",
        "positions",
        "cache/0.k",
        "cache/0.v",
    ]
    assert decode["mlir_arguments"] == decode["flat_inputs"]  # one platform, every input used
    assert manifest["functions"]["prefill"]["flat_inputs"][len(names) : len(names) + 2] == [
        "tokens",
        "lengths",
    ]
    mlir = (exported / decode["mlir"]).read_text()
    assert "func.func public @main" in mlir and "stablehlo." in mlir
    assert "custom_call" not in mlir  # nothing a runtime would need llmarch's kernels for
    assert (exported / "stablehlo_loader.py").read_text().count("import llmarch") == 0


def test_one_artifact_lowered_for_cpu_cuda_and_tpu_runs_on_cpu(model, reference, tmp_path):
    """Lowering for GPU and TPU needs no such hardware (jax.export, as DESIGN.md checks kernels);
    the artifact then takes a platform index first and runs here as the CPU one does."""
    m, cfg = model
    out = export_stablehlo(
        m, cfg, tmp_path / "multi", batch=2, max_len=24, prefill_len=8, platforms=("cpu", "cuda", "tpu")
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
    assert manifest["functions"]["prefill"]["mlir_arguments"][0] == "platform_index"
    assert load_stablehlo(out).generate(PROMPTS, STEPS) == reference[0]


@pytest.mark.slow
def test_moe_and_mla_export(tmp_path):
    """Other block kinds export through the same steps: an MoE and an MLA model's greedy tokens."""
    for preset in ("tiny-moe", "tiny-mla"):
        cfg = llmarch.presets.get(preset)
        m = llmarch.Transformer(cfg, rngs=nnx.Rngs(1))
        out = export_stablehlo(m, cfg, tmp_path / preset, batch=1, max_len=16, prefill_len=6)
        prompt = PROMPTS[0]
        expected = generate(m, np.asarray([prompt]), 5)[0, len(prompt) :].tolist()
        assert load_stablehlo(out).generate([prompt], 5) == [expected], preset


def test_refusals(model, tmp_path):
    m, cfg = model
    out = tmp_path / "never"
    cases = [
        (dict(batch=0), r"batch=0 is invalid: must be an int in \[1, "),
        (
            dict(max_len=cfg.max_seq_len + 1),
            rf"max_len={cfg.max_seq_len + 1} is invalid: must be an int in \[1, {cfg.max_seq_len}\]",
        ),
        (dict(max_len=16, prefill_len=17), r"prefill_len=17 is invalid: must be an int in \[1, 16\]"),
        (dict(platforms=("gpu",)), r"platforms=\('gpu',\) is invalid: must be distinct names from"),
        (dict(platforms="cpu"), "platforms='cpu' is invalid"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            export_stablehlo(m, cfg, out, **kwargs)
    with pytest.raises(ValueError, match="cfg does not describe model"):
        export_stablehlo(m, cfg.replace(name="other"), out)
    from llmarch.quant import QuantConfig, quantize

    with pytest.raises(ValueError, match="model is quantized"):
        export_stablehlo(quantize(m, cfg, QuantConfig(), progress=False), cfg, out)
    assert not out.exists()


def test_loader_checks_its_inputs(exported):
    x = load_stablehlo(exported)
    with pytest.raises(ValueError, match=r"tokens has shape \(1, 8\) and dtype int64: expected int \(2, 8\)"):
        x.prefill(np.zeros((1, 8), np.int64), [1, 1])
    with pytest.raises(ValueError, match="every prompt needs >= 1 token"):
        x.prefill(np.zeros((2, 8), np.int32), [0, 3])
    with pytest.raises(ValueError, match=r"positions spans \[0, 24\]: allowed range is \[0, 24\)"):
        x.decode([1, 2], [0, 24], x.init_cache())
    with pytest.raises(ValueError, match=r"exceeds max_len=24"):
        x.generate(PROMPTS, 20)
    (exported.parent / "bad").mkdir()
    with pytest.raises(FileNotFoundError, match="not a StableHLO export directory"):
        load_stablehlo(exported.parent / "bad")
