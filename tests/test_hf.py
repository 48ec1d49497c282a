"""llmarch.hf against transformers' LlamaForCausalLM: logits parity, exact round trips, errors.

Weights are random everywhere, norm scales included (HF and llmarch both start them at one),
so that a swapped or transposed mapping changes the logits or breaks the round trip.
"""

import json
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import llmarch
from llmarch import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

V, T = 128, 64
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def _hf_config(**overrides):
    kw = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return transformers.LlamaConfig(**{**kw, **overrides})


def _torch_model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _tiny_cfg(**overrides):
    attention = llmarch.AttentionConfig(
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=500_000.0,
        rope_scaling=llmarch.RopeScaling(factor=4.0, original_max_position_embeddings=32),
    )
    kw = dict(
        vocab_size=V,
        d_model=64,
        num_layers=3,
        ffn_dim=160,
        attention=attention,
        max_seq_len=128,
        norm_eps=1e-5,
        init_std=0.1,
        name="tiny-hf",
    )
    return llmarch.ModelConfig(**{**kw, **overrides})


def _llmarch_model(cfg, seed=0):
    graphdef, state = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(seed)))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), state)
    return nnx.merge(graphdef, state)


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, V, (2, T)).astype(np.int32)


def _flat(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_state(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        assert fa[path].dtype == fb[path].dtype, path
        assert np.array_equal(fa[path], fb[path]), path


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE},
    ],
    ids=["gqa-untied", "llama3-rope-tied"],
)
def test_load_matches_transformers_logits(tmp_path, overrides):
    ref = _torch_model(_hf_config(**overrides))
    ref.save_pretrained(tmp_path)
    model, cfg = hf.load_pretrained(tmp_path)
    assert cfg.attention.num_kv_heads == 2 and cfg.tie_embeddings == bool(overrides)
    assert (cfg.attention.rope_scaling is None) == (not overrides)
    tokens = _tokens()  # T=64 > original_max_position_embeddings: the scaling matters
    np.testing.assert_allclose(np.asarray(model(tokens)), _torch_logits(ref, tokens), atol=1e-4)


def test_round_trip_is_exact_and_transformers_loads_it(tmp_path):
    cfg = _tiny_cfg()
    model = _llmarch_model(cfg)
    hf.save_pretrained(model, cfg, tmp_path)
    loaded, loaded_cfg = hf.load_pretrained(tmp_path)
    _assert_same_state(model, loaded)
    # HF carries all but the name; the import records the architecture
    assert loaded_cfg == cfg.replace(name=loaded_cfg.name, hf_model_type="llama")

    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert ref.dtype == torch.float32
    tokens = _tokens(1)
    np.testing.assert_allclose(_torch_logits(ref, tokens), np.asarray(model(tokens)), atol=1e-4)


def test_sharded_save_loads_back_exactly(tmp_path):
    cfg = _tiny_cfg(tie_embeddings=True, num_layers=2)
    model = _llmarch_model(cfg)
    hf.save_pretrained(model, cfg, tmp_path, max_shard_bytes=50_000)
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and "lm_head.weight" not in index["weight_map"]
    assert not (tmp_path / hf.WEIGHTS_FILE).exists()
    loaded, _ = hf.load_pretrained(tmp_path)
    _assert_same_state(model, loaded)

    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    ours = hf.to_hf_tensors(model)
    for name, w in ref.state_dict().items():
        if name != "lm_head.weight":  # tied: the same tensor as the embedding
            assert np.array_equal(w.numpy(), ours[name]), name

    # Saving again unsharded removes the shards, so no stale index shadows the new weights.
    hf.save_pretrained(model, cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [hf.CONFIG_FILE, hf.WEIGHTS_FILE]


def test_bfloat16_checkpoint(tmp_path):
    ref = _torch_model(_hf_config()).to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    q = ref.state_dict()["model.layers.1.self_attn.q_proj.weight"].float().numpy()  # [N*H, D]
    model, cfg = hf.load_pretrained(tmp_path)  # float32 by default
    w = model.runs[0].layers.attention.w_q_dnh.w[...]
    assert cfg.param_dtype == "float32" and w.dtype == np.float32
    assert np.array_equal(np.asarray(w[1]).reshape(64, -1), q.T)
    model, cfg = hf.load_pretrained(tmp_path, dtype="bfloat16")
    assert cfg.param_dtype == cfg.dtype == "bfloat16"
    assert model.embed.table_vd[...].dtype == jax.numpy.bfloat16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    cfg = _tiny_cfg(num_layers=2)
    hf.save_pretrained(_llmarch_model(cfg), cfg, path)
    return path


def _copy(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def test_missing_files(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hf.load_pretrained(tmp_path / "nowhere")
    path = _copy(checkpoint, tmp_path)
    (path / hf.WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(hf.WEIGHTS_FILE)):
        hf.load_pretrained(path)
    (path / hf.CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(hf.CONFIG_FILE)):
        hf.load_pretrained(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "mistral"}, "model_type"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "'yarn'"),
        ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_unsupported_config(tmp_path, checkpoint, edit, match):
    path = _copy(checkpoint, tmp_path)
    config = json.loads((path / hf.CONFIG_FILE).read_text())
    (path / hf.CONFIG_FILE).write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=match):
        hf.load_pretrained(path)


def _drop_q(t):
    del t["model.layers.1.self_attn.q_proj.weight"]


def _add_extra(t):
    t["model.layers.7.mlp.extra.weight"] = np.zeros(3, np.float32)


def _bad_shape(t):
    t["model.layers.0.mlp.down_proj.weight"] = np.zeros((64, 8), np.float32)


@pytest.mark.parametrize(
    "edit, match",
    [
        (_drop_q, r"missing \[model\.layers\.1\.self_attn\.q_proj\.weight\]"),
        (_add_extra, r"unexpected \[model\.layers\.7\.mlp\.extra\.weight\]"),
        (_bad_shape, r"model\.layers\.0\.mlp\.down_proj\.weight has shape \(64, 8\)"),
    ],
)
def test_tensors_must_match_config(tmp_path, checkpoint, edit, match):
    path = _copy(checkpoint, tmp_path)
    tensors = load_file(path / hf.WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, path / hf.WEIGHTS_FILE)
    with pytest.raises(ValueError, match=match):
        hf.load_pretrained(path)


def test_rotary_buffers_are_ignored(tmp_path, checkpoint):
    path = _copy(checkpoint, tmp_path)
    tensors = load_file(path / hf.WEIGHTS_FILE)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    save_file(tensors, path / hf.WEIGHTS_FILE)
    hf.load_pretrained(path)


def test_export_rejects_what_llama_cannot_hold():
    cfg = _tiny_cfg()
    window = cfg.replace(
        attention=llmarch.AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, sliding_window=8)
    )
    with pytest.raises(ValueError, match="sliding_window"):
        hf.config_to_hf(window)
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cfg does not describe model"):
        hf.save_pretrained(model, cfg.replace(num_layers=2), "unused")
