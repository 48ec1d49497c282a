"""llmarch.hf against transformers' DeepseekV3ForCausalLM (all layers dense): MLA logits parity with
and without query compression, YaRN and interleaved RoPE, exact round trips, unsupported configs.

All weights are random, norm scales included, so a swapped, transposed or mis-permuted tensor, or a
wrong YaRN scale, changes the logits.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import hf
from llmarch.config import BlockConfig, MLAConfig, YarnScaling

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

V, T = 128, 64
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10_000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.8,
    "mscale_all_dim": 0.6,
}


def _hf_config(**overrides):
    kw = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=24,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        first_k_dense_replace=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return transformers.DeepseekV3Config(**{**kw, **overrides})


def _torch_model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _tokens(seed=0):  # T=64 > original_max_position_embeddings=16: YaRN matters
    return np.random.default_rng(seed).integers(0, V, (2, T)).astype(np.int32)


@pytest.mark.parametrize(
    "overrides",
    [
        {"rope_parameters": YARN},  # rope_interleave defaults to True, as in DeepSeek's checkpoints
        {"q_lora_rank": None, "rope_interleave": False},
    ],
    ids=["q-lora-yarn-interleaved", "no-q-lora-rotate-half"],
)
def test_load_matches_transformers_logits(tmp_path, overrides):
    ref = _torch_model(_hf_config(**overrides))
    ref.save_pretrained(tmp_path)
    model, cfg = hf.load_pretrained(tmp_path)
    assert cfg.mla.q_lora_rank == overrides.get("q_lora_rank", 24)
    assert cfg.layer_blocks == (BlockConfig(attention="mla"),) * 2
    assert (cfg.mla.rope_scaling is None) == ("rope_parameters" not in overrides)
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(model(tokens)), _torch_logits(ref, tokens), atol=1e-4)


def _mla_cfg(q_lora_rank):
    m = MLAConfig(
        num_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        rope_scaling=YarnScaling(4.0, 16, mscale=1.0, mscale_all_dim=0.7),
    )
    return llmarch.ModelConfig(
        vocab_size=V,
        d_model=64,
        num_layers=2,
        ffn_dim=96,
        attention=m.mha_baseline(),
        mla=m,
        max_seq_len=128,
        norm_eps=1e-5,
        blocks=(BlockConfig(attention="mla"),) * 2,
        init_std=0.1,
        name="tiny",
    )


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_round_trip_is_exact_and_transformers_loads_it(tmp_path, q_lora_rank):
    cfg = _mla_cfg(q_lora_rank)
    graphdef, state = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)  # numpy noise: no compile per weight shape
    model = nnx.merge(
        graphdef, jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), state)
    )
    hf.save_pretrained(model, cfg, tmp_path)
    loaded, loaded_cfg = hf.load_pretrained(tmp_path)
    assert loaded_cfg == cfg.replace(name=loaded_cfg.name, hf_model_type="deepseek_v3")
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    for path, var in nnx.to_flat_state(nnx.state(loaded)):
        assert np.array_equal(var.get_value(), flat[path].get_value()), path

    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    tokens = _tokens(1)
    np.testing.assert_allclose(_torch_logits(ref, tokens), np.asarray(model(tokens)), atol=1e-4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek")
    _torch_model(_hf_config(rope_parameters=YARN)).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "edit, match",
    [
        # MoE layers load since issue 5 (tests/test_hf_mixtral.py); a mismatch names the tensors.
        ({"first_k_dense_replace": 1}, r"missing \[model.layers.1.mlp.experts.0.down_proj.weight"),
        ({"first_k_dense_replace": 1, "scoring_func": "softmax"}, r"scoring_func='softmax'.*'sigmoid'"),
        ({"num_key_value_heads": 2}, r"num_key_value_heads=2"),
        ({"attention_bias": True}, r"attention_bias"),
        ({"rope_parameters": {**YARN, "rope_type": "llama3"}}, r"rope_type='llama3'.*'default', 'yarn'"),
        ({"rope_parameters": {**YARN, "attention_factor": 1.5}}, r"attention_factor=1.5"),
        ({"kv_lora_rank": None}, r"kv_lora_rank"),
    ],
)
def test_unsupported_config(tmp_path, checkpoint, edit, match):
    path = shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    config = json.loads((path / hf.CONFIG_FILE).read_text())
    (path / hf.CONFIG_FILE).write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=match):
        hf.load_pretrained(path)


def test_mixed_attention_kinds_have_no_hf_architecture():
    cfg = _mla_cfg(24).replace(blocks=(BlockConfig(attention="mla"), BlockConfig(attention="mha")))
    with pytest.raises(ValueError, match="mix 'mla' with other attention kinds"):
        hf.config_to_hf(cfg)
