"""llmarch.hf with DeepSeek-V3's published checkpoint layout: FP8 e4m3 weights with 128×128
``weight_scale_inv`` blocks, ``quantization_config`` in config.json, and the MTP layer as
``model.layers.{num_hidden_layers}.*``, in index-listed shards.

The checkpoint is fabricated here in exactly that layout: a random transformers DeepseekV3 model
(dense and MoE layers, shared and routed experts) whose linears torch block-quantizes to
``float8_e4m3fn``, with dimensions that are not multiples of 128 (160, 200, 136, 72...) so partial
blocks are exercised, plus a fabricated MTP layer. Its logits are compared with transformers' on the
weights dequantized in torch; llmarch's own FP8 save is compared byte for byte with the torch
quantization of the same weights.
"""

import json
import logging
import re
import shutil

import numpy as np
import pytest
from flax import nnx

from llmarch import hf
from llmarch.hf import fp8

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.hf

V, T, B = 128, 24, 128  # vocabulary, tokens, block edge
QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
# The linears DeepSeek ships in FP8 (attention, dense/shared/routed experts, MTP's eh_proj); not the
# embedding, head, norms, router or its bias.
DEEPSEEK_FP8 = re.compile(
    r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|eh_proj|"
    r"mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight"
)
MTP_EXTRA = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight")
MTP_EXTRA += ("shared_head.norm.weight", "shared_head.head.weight")


def _hf_config(**overrides):
    kw = dict(
        vocab_size=V,
        hidden_size=160,  # 128 + a partial block of 32
        intermediate_size=200,
        moe_intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        q_lora_rank=136,
        kv_lora_rank=40,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        num_nextn_predict_layers=1,
    )
    return transformers.DeepseekV3Config(**{**kw, **overrides})


def _random_checkpoint(config, path, seed=0):
    """A random float32 DeepseekV3ForCausalLM saved to ``path``; returns its tensors (HF names)."""
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "inv_freq" not in name:
                noise = torch.randn_like(p)
                p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    model.save_pretrained(path)
    return safetensors_torch.load_file(path / hf.WEIGHTS_FILE)


def torch_quantize(w):
    """DeepSeek-V3's 128×128 block quantization in torch (llmarch.quant.fp8_blockwise's numerics):
    ``s = max(amax · fl(1/448), 2^-126)``, ``q = e4m3(clip(w · fl(1/s), ±448))``, partial blocks
    zero-padded. Returns ``(q float8_e4m3fn [out, in], weight_scale_inv float32 [⌈out/128⌉, ⌈in/128⌉])``."""
    rows, cols = w.shape
    padded = torch.zeros(-(-rows // B) * B, -(-cols // B) * B)
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(padded.shape[0] // B, B, padded.shape[1] // B, B)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.clamp(
        amax * torch.tensor(1 / 448, dtype=torch.float32), min=torch.finfo(torch.float32).tiny
    )
    q = torch.clamp(blocks * (1.0 / scale)[:, None, :, None], -448, 448).to(torch.float8_e4m3fn)
    return q.reshape(padded.shape)[:rows, :cols].contiguous(), scale


def torch_dequantize(q, scale):
    rows, cols = q.shape
    full = scale.repeat_interleave(B, 0).repeat_interleave(B, 1)[:rows, :cols]
    return q.float() * full


def _write(path, tensors, config, shards=1):
    """A checkpoint directory: config.json and the tensors in ``shards`` files with an index (the
    published layout) when more than one; tensors are dealt round-robin, so a weight and its scale
    usually land in different shards."""
    path.mkdir(parents=True, exist_ok=True)
    (path / hf.CONFIG_FILE).write_text(json.dumps(config))
    if shards == 1:
        safetensors_torch.save_file(tensors, path / hf.WEIGHTS_FILE, metadata={"format": "pt"})
        return path
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {name: files[i % shards] for i, name in enumerate(sorted(tensors))}
    for file in files:
        part = {n: t for n, t in tensors.items() if weight_map[n] == file}
        safetensors_torch.save_file(part, path / file, metadata={"format": "pt"})
    (path / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _mtp_layer(tensors, layers):
    """A fabricated MTP module at ``model.layers.{layers}``: a copy of the last decoder layer (MoE)
    plus the MTP-only tensors, with the published FP8 quantization of its linears."""
    torch.manual_seed(1)
    last, mtp = f"model.layers.{layers - 1}.", f"model.layers.{layers}."
    out = {
        mtp + n.removeprefix(last): torch.randn_like(t) * 0.1
        for n, t in tensors.items()
        if n.startswith(last)
    }
    d, v = tensors["model.norm.weight"].shape[0], tensors["lm_head.weight"].shape[0]
    shapes = {"enorm.weight": (d,), "hnorm.weight": (d,), "eh_proj.weight": (d, 2 * d)}
    shapes |= {
        "embed_tokens.weight": (v, d),
        "shared_head.norm.weight": (d,),
        "shared_head.head.weight": (v, d),
    }
    return out | {mtp + n: torch.randn(shape) * 0.1 for n, shape in shapes.items()}


def _publish(tensors):
    """``tensors`` in the published layout: DEEPSEEK_FP8 ones as e4m3 + weight_scale_inv."""
    out = {}
    for name, t in tensors.items():
        if DEEPSEEK_FP8.fullmatch(name):
            out[name], out[name + "_scale_inv"] = torch_quantize(t)
        else:
            out[name] = t
    return out


def _dequantized(published):
    return {
        n: torch_dequantize(t, published[n + "_scale_inv"]) if n + "_scale_inv" in published else t
        for n, t in published.items()
        if not n.endswith("_scale_inv")
    }


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, V, (2, T)).astype(np.int32)


def _torch_logits(path, tokens):
    with torch.no_grad():
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(path).eval()
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(fp8 dir in the published layout with an MTP layer, float dir it was quantized from, the
    dequantized weights as a float checkpoint dir for transformers, the published tensors)."""
    root = tmp_path_factory.mktemp("deepseek_fp8")
    config = _hf_config()
    tensors = _random_checkpoint(config, root / "float")
    hf_config = json.loads((root / "float" / hf.CONFIG_FILE).read_text())
    main = _publish(tensors)
    with_mtp = main | _publish(_mtp_layer(tensors, config.num_hidden_layers))
    fp8_dir = _write(
        root / "fp8", with_mtp, {**hf_config, "quantization_config": QUANTIZATION_CONFIG}, shards=3
    )
    deq_dir = _write(root / "dequantized", _dequantized(main), hf_config)
    return fp8_dir, root / "float", deq_dir, with_mtp


def test_published_layout_has_partial_blocks(published):
    *_, tensors = published
    scales = {n: t.shape for n, t in tensors.items() if n.endswith("_scale_inv")}
    assert scales["model.layers.0.self_attn.q_a_proj.weight_scale_inv"] == (2, 2)  # [136, 160]
    assert scales["model.layers.0.mlp.down_proj.weight_scale_inv"] == (2, 2)  # [160, 200]
    assert scales["model.layers.2.eh_proj.weight_scale_inv"] == (2, 3)  # MTP [160, 320]
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in scales  # the router stays float
    assert tensors["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn


def test_load_matches_transformers_on_dequantized_weights(published, caplog):
    fp8_dir, _, deq_dir, tensors = published
    with caplog.at_level(logging.WARNING, logger="llmarch.hf.mtp"):
        model, cfg = hf.load_pretrained(fp8_dir, mtp=False)
    mtp = [n for n in tensors if n.startswith("model.layers.2.")]
    assert len(mtp) == 53  # 6 module tensors, 26 of the MoE decoder layer, 21 FP8 scales
    [record] = caplog.records
    assert f"skipped {len(mtp)} multi-token prediction tensors" in record.getMessage()
    assert "num_nextn_predict_layers=1: model.layers.2-2.*" in record.getMessage()
    assert "built with ModelConfig.mtp_depth=0" in record.getMessage()

    # The partial block [128:136, 128:160] of q_a_proj holds exactly q · its scale.
    name = "model.layers.0.self_attn.q_a_proj.weight"
    want = torch_dequantize(tensors[name], tensors[name + "_scale_inv"]).numpy()
    got = hf.to_hf_tensors(model, cfg)[name]
    np.testing.assert_array_equal(got, want)

    tokens = _tokens()
    logits, ref = np.asarray(model(tokens)), _torch_logits(deq_dir, tokens)
    np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_fp8_save_is_torch_quantization_and_reloads(published, tmp_path):
    _, float_dir, _, _ = published
    model, cfg = hf.load_pretrained(float_dir)
    tokens = _tokens(1)
    before = np.asarray(model(tokens))
    hf.save_pretrained(model, cfg, tmp_path / "out", fp8=True)

    config = json.loads((tmp_path / "out" / hf.CONFIG_FILE).read_text())
    assert config["quantization_config"] == QUANTIZATION_CONFIG
    saved = safetensors_torch.load_file(tmp_path / "out" / hf.WEIGHTS_FILE)
    source = safetensors_torch.load_file(float_dir / hf.WEIGHTS_FILE)
    want = _publish(source)
    assert saved.keys() == want.keys()
    for name, t in want.items():  # e4m3 bytes and float32 scales identical to torch's
        assert saved[name].dtype == t.dtype, name
        assert torch.equal(saved[name].view(torch.uint8), t.view(torch.uint8)), name
    assert sum(n.endswith("_scale_inv") for n in saved) == 28  # 2·5 MLA, 3 dense, 3 shared, 4·3 routed

    loaded, loaded_cfg = hf.load_pretrained(tmp_path / "out")
    assert loaded_cfg == cfg.replace(name=loaded_cfg.name)
    after = np.asarray(loaded(tokens))
    # Within e4m3's error: 2.6% RMS per weight here, which this random, untrained model amplifies
    # (with MoE routing flips) to 22% RMS in the logits (measured); and exactly transformers' logits on
    # the torch-dequantized weights.
    assert np.sqrt(np.mean((after - before) ** 2) / np.mean(before**2)) < 0.3
    deq_dir = _write(
        tmp_path / "deq", _dequantized(want), json.loads((float_dir / hf.CONFIG_FILE).read_text())
    )
    np.testing.assert_allclose(after, _torch_logits(deq_dir, tokens), atol=1e-4)

    # Saving the dequantized model in FP8 again gives the same e4m3 bytes.
    hf.save_pretrained(loaded, loaded_cfg, tmp_path / "again", fp8=True)
    again = safetensors_torch.load_file(tmp_path / "again" / hf.WEIGHTS_FILE)
    for name, t in saved.items():
        if t.dtype == torch.float8_e4m3fn:
            assert torch.equal(again[name].view(torch.uint8), t.view(torch.uint8)), name


def test_transformers_loads_llmarch_fp8_save(tmp_path):
    # transformers' CPU path dequantizes with a block derived from the scale grid (rows // scale rows),
    # right only for whole blocks: every quantized dimension here is a multiple of 128.
    config = _hf_config(
        hidden_size=128,
        intermediate_size=128,
        moe_intermediate_size=128,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=64,
        n_routed_experts=2,
        num_experts_per_tok=1,
        n_group=1,
    )
    _random_checkpoint(config, tmp_path / "float")
    model, cfg = hf.load_pretrained(tmp_path / "float")
    hf.save_pretrained(model, cfg, tmp_path / "fp8", fp8=True)
    loaded, _ = hf.load_pretrained(tmp_path / "fp8")
    tokens = _tokens(2)
    np.testing.assert_allclose(_torch_logits(tmp_path / "fp8", tokens), np.asarray(loaded(tokens)), atol=1e-4)


def _edit_tensors(edit):
    def apply(tensors):
        tensors = dict(tensors)
        edit(tensors)
        return tensors

    return apply


SCALE = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
WEIGHT = SCALE.removesuffix("_scale_inv")


def _nan_byte(tensors):
    """e4m3's NaN (0x7F) written into the weight's first byte."""
    w = tensors[WEIGHT].clone()
    w.view(torch.uint8)[0, 0] = 0x7F
    tensors[WEIGHT] = w


@pytest.mark.parametrize(
    "config_edit, tensors_edit, match",
    [
        (
            {"quant_method": "awq"},
            None,
            r"quantization_config.quant_method='awq' is not supported; allowed: 'fp8'",
        ),
        ({"fmt": "e5m2"}, None, r"quantization_config.fmt='e5m2' is not supported; allowed: 'e4m3'"),
        ({"activation_scheme": "static"}, None, r"activation_scheme='static'.*allowed: 'dynamic'"),
        ({"weight_block_size": [128]}, None, r"weight_block_size=\[128\] is invalid: must be two positive"),
        ({"weight_block_size": [0, 128]}, None, r"weight_block_size=\[0, 128\] is invalid"),
        (
            {"weight_block_size": [64, 64]},
            None,
            r"q_a_proj.weight_scale_inv has shape \(2, 2\) .* in 64x64 blocks needs \(3, 3\)",
        ),
        (None, lambda t: t.pop(SCALE), rf"tensor {re.escape(WEIGHT)} .* is float8_e4m3fn with no {SCALE}"),
        (None, lambda t: t.update({SCALE: t[SCALE][:, :1]}), rf"{SCALE} has shape \(1, 1\).*needs \(1, 2\)"),
        (
            None,
            lambda t: t.update({SCALE: t[SCALE] * float("nan")}),
            rf"{SCALE} .* holds nan at block \(0, 0\)",
        ),
        (
            None,
            lambda t: t.update({WEIGHT: t[WEIGHT].float()}),
            rf"{WEIGHT} .* has dtype float32: .*float8_e4m3fn",
        ),
        (None, lambda t: t.pop(WEIGHT), rf"scale a weight it lacks: {SCALE}"),
        ("drop", None, r"are FP8 block scales .* has no quantization_config"),
        (None, _nan_byte, rf"{WEIGHT} .* dequantizes to nan at \(0, 0\) \(block \(0, 0\)\)"),
        (
            None,
            lambda t: t.update({SCALE: torch.full_like(t[SCALE], 1e38)}),
            rf"{WEIGHT} .* dequantizes to -?inf .*weights must be finite",
        ),
    ],
    ids=[
        "quant-method",
        "fmt",
        "activation-scheme",
        "block-size-length",
        "block-size-zero",
        "block-size-mismatch",
        "missing-scale",
        "scale-shape",
        "scale-nan",
        "weight-not-fp8",
        "orphan-scale",
        "no-quantization-config",
        "weight-nan-byte",
        "scale-overflows",
    ],
)
def test_corrupted_fp8_checkpoints_fail_in_one_line(published, tmp_path, config_edit, tensors_edit, match):
    fp8_dir, *_ = published
    path = shutil.copytree(fp8_dir, tmp_path / "ckpt")
    config = json.loads((path / hf.CONFIG_FILE).read_text())
    if config_edit == "drop":
        del config["quantization_config"]
    elif config_edit:
        config["quantization_config"] = {**config["quantization_config"], **config_edit}
    (path / hf.CONFIG_FILE).write_text(json.dumps(config))
    if tensors_edit:
        index = json.loads((path / hf.INDEX_FILE).read_text())["weight_map"]
        tensors = {}
        for file in set(index.values()):
            tensors |= safetensors_torch.load_file(path / file)
            (path / file).unlink()
        (path / hf.INDEX_FILE).unlink()
        _write(path, _edit_tensors(tensors_edit)(tensors), config, shards=3)
    with pytest.raises(ValueError, match=match) as info:
        hf.load_pretrained(path)
    assert "\n" not in str(info.value)


def test_fp8_flag_is_checked(published, tmp_path):
    _, float_dir, _, _ = published
    model, cfg = hf.load_pretrained(float_dir)
    with pytest.raises(ValueError, match=r"fp8='yes' is invalid"):
        hf.save_pretrained(model, cfg, tmp_path, fp8="yes")


def test_quantize_matches_fp8_blockwise_on_whole_blocks():
    from llmarch.quant.fp8_blockwise import dequantize_weight_blocks

    w = np.random.default_rng(0).standard_normal((256, 384)).astype(np.float32)
    q, s = fp8.quantize(w)
    assert q.dtype == fp8.E4M3 and s.shape == (2, 3)
    np.testing.assert_array_equal(
        fp8.dequantize(q, s, (128, 128)), np.asarray(dequantize_weight_blocks(q, s))
    )
    tq, ts = torch_quantize(torch.from_numpy(w))
    np.testing.assert_array_equal(q.view(np.uint8), tq.view(torch.uint8).numpy())
    np.testing.assert_array_equal(s, ts.numpy())


def test_dequantizes_to_the_parameter_dtype(published):
    fp8_dir, _, deq_dir, _ = published
    model, _ = hf.load_pretrained(fp8_dir, dtype="bfloat16", mtp=False)
    want, _ = hf.load_pretrained(deq_dir, dtype="bfloat16")  # the torch-dequantized weights
    flat = dict(nnx.to_flat_state(nnx.state(want)))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        assert var.get_value().dtype == flat[path].get_value().dtype, path
        assert np.array_equal(var.get_value(), flat[path].get_value()), path
    assert flat[("embed", "table_vd")].get_value().dtype.name == "bfloat16"


def test_cli_export_writes_the_fp8_layout(published, tmp_path, capsys):
    from llmarch.cli import main

    fp8_dir, *_, tensors = published
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(fp8_dir), "--out", str(out), "--fp8"]) == 0
    assert json.loads(capsys.readouterr().out)["fp8"] is True
    saved = safetensors_torch.load_file(out / hf.WEIGHTS_FILE)
    assert saved.keys() == tensors.keys()  # the MTP layer included
    copies = {"model.layers.2.embed_tokens.weight": "model.embed_tokens.weight"}
    copies["model.layers.2.shared_head.head.weight"] = "lm_head.weight"
    for name, t in tensors.items():  # dequantized and quantized again: the same e4m3 bytes
        if t.dtype == torch.float8_e4m3fn:
            assert torch.equal(saved[name].view(torch.uint8), t.view(torch.uint8)), name
        elif name in copies:  # the MTP layer's copies of the embedding and head are the shared ones
            assert torch.equal(saved[name], tensors[copies[name]]), name
    gguf = ["--out", str(tmp_path / "x.gguf"), "--format", "gguf", "--fp8"]
    assert main(["export", "--checkpoint", str(fp8_dir), *gguf]) == 2
    assert "--fp8 applies to --format hf, not gguf" in capsys.readouterr().err


def test_mtp_layers_load_as_the_models_mtp_modules_and_save_back(published, tmp_path):
    """The published MTP layer becomes ``model.mtp[0]`` (``mtp_depth`` from the tensors held); the main
    logits are those of the model without it; saved in the FP8 layout and read back, every variable is
    unchanged up to the requantization, and ``num_nextn_predict_layers`` says so."""
    fp8_dir, *_, tensors = published
    model, cfg = hf.load_pretrained(fp8_dir)
    plain, _ = hf.load_pretrained(fp8_dir, mtp=False)
    assert cfg.mtp_depth == 1 and len(model.mtp) == 1
    layer = "model.layers.2."

    def deq(name):
        return torch_dequantize(tensors[name], tensors[name + "_scale_inv"]).numpy()

    m = model.mtp[0]
    np.testing.assert_array_equal(np.asarray(m.eh_proj.w.get_value()), deq(layer + "eh_proj.weight").T)
    np.testing.assert_array_equal(np.asarray(m.enorm.scale.get_value()), tensors[layer + "enorm.weight"])
    np.testing.assert_array_equal(
        np.asarray(m.norm.scale.get_value()), tensors[layer + "shared_head.norm.weight"]
    )
    tokens = _tokens()
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(plain(tokens)))  # copies lose
    hf.save_pretrained(model, cfg, tmp_path, fp8=True)
    assert json.loads((tmp_path / hf.CONFIG_FILE).read_text())["num_nextn_predict_layers"] == 1
    back, back_cfg = hf.load_pretrained(tmp_path)
    assert back_cfg.mtp_depth == 1
    want = dict(nnx.to_flat_state(nnx.state(model)))
    for path, var in nnx.to_flat_state(nnx.state(back)):  # requantized: a scale may move by an ulp
        np.testing.assert_allclose(var.get_value(), want[path].get_value(), rtol=1e-6, err_msg=str(path))


def test_mtp_tensors_only_for_deepseek_and_whole():
    import llmarch
    from llmarch.hf import architectures, mtp, plan

    cfg = llmarch.presets.get("tiny-dense").replace(mtp_depth=1)
    with pytest.raises(ValueError, match=r"only DeepSeek-V3 checkpoints hold MTP modules, not 'llama'"):
        plan.mtp_entries(cfg, architectures.of_config(cfg), {})
    config = {"num_hidden_layers": 2, "num_nextn_predict_layers": 2}
    with pytest.raises(ValueError, match=r"only layers \[2\] of model.layers.2-3 have tensors"):
        mtp.depth_held({"model.layers.2.enorm.weight": 0}, config)
    assert mtp.depth_held({"model.layers.1.x": 0}, config) == 0
