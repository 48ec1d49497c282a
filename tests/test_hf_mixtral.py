"""llmarch.hf with MoE layers against transformers: MixtralForCausalLM, and DeepseekV3ForCausalLM with
MoE layers (group-limited routing, shared experts, e_score_correction_bias), logits and round trips.

Every weight is random, the routing bias included (a buffer, not a parameter, in transformers), so a
swapped expert, a transposed router or an ignored bias changes which experts are chosen.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import hf
from llmarch.config import MoEConfig, moe_blocks

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

V, T = 96, 24


def _randomize(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "inv_freq" in name:
                continue
            noise = torch.randn_like(p)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, V, (2, T)).astype(np.int32)


def _mixtral():
    config = transformers.MixtralConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return _randomize(transformers.MixtralForCausalLM(config))


def _deepseek():
    config = transformers.DeepseekV3Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return _randomize(transformers.DeepseekV3ForCausalLM(config))


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v3"])
def checkpoint(request, tmp_path_factory):
    ref = _mixtral() if request.param == "mixtral" else _deepseek()
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return request.param, ref, path


def test_load_matches_transformers_logits(checkpoint):
    arch, ref, path = checkpoint
    model, cfg = hf.load_pretrained(path)
    if arch == "mixtral":
        assert cfg.moe == MoEConfig(num_experts=4, top_k=2, expert_dim=48, aux_loss_coef=0.001)
        assert cfg.layer_blocks == moe_blocks(2)
    else:
        m = cfg.moe
        assert (m.router, m.n_group, m.topk_group, m.num_shared_experts, m.route_scale) == (
            "sigmoid",
            4,
            2,
            2,
            2.5,
        )
        assert [b.ffn for b in cfg.layer_blocks] == ["swiglu", "moe", "moe"]
        bias = model.runs[1].layers.ffn.bias_e[...]
        want = ref.model.layers[2].mlp.gate.e_score_correction_bias.numpy()
        np.testing.assert_array_equal(np.asarray(bias)[1], want)
        assert np.abs(want).max() > 0.05  # random, so routing depends on it
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(model(tokens)), _logits(ref, tokens), atol=1e-4)


def test_round_trip_is_exact_and_transformers_loads_it(checkpoint, tmp_path):
    arch, ref, path = checkpoint
    model, cfg = hf.load_pretrained(path)
    hf.save_pretrained(model, cfg, tmp_path)
    saved = json.loads((tmp_path / hf.CONFIG_FILE).read_text())
    assert saved["model_type"] == arch
    loaded, loaded_cfg = hf.load_pretrained(tmp_path)
    assert loaded_cfg == cfg.replace(name=loaded_cfg.name)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    for p, var in nnx.to_flat_state(nnx.state(loaded)):
        assert np.array_equal(var.get_value(), flat[p].get_value()), p
    cls = transformers.MixtralForCausalLM if arch == "mixtral" else transformers.DeepseekV3ForCausalLM
    again = cls.from_pretrained(tmp_path).eval()
    tokens = _tokens(1)
    np.testing.assert_allclose(_logits(again, tokens), _logits(ref, tokens), atol=1e-5)


def test_llmarch_moe_configs_export_or_refuse():
    cfg = llmarch.presets.get("tiny-moe")
    assert hf.config_to_hf(cfg)["model_type"] == "mixtral"
    assert hf.config_to_hf(llmarch.presets.get("tiny-deepseek"))["first_k_dense_replace"] == 1
    biased = cfg.replace(moe=MoEConfig(num_experts=8, top_k=2, expert_dim=16, router_bias=True))
    with pytest.raises(ValueError, match="router_bias=True has no Mixtral equivalent"):
        hf.config_to_hf(biased)
    mixed = cfg.replace(blocks=moe_blocks(2, 1))
    with pytest.raises(ValueError, match="Mixtral has an MoE in every layer"):
        hf.config_to_hf(mixed)
    softmax = llmarch.presets.get("tiny-deepseek")
    softmax = softmax.replace(moe=MoEConfig(num_experts=8, top_k=2, expert_dim=16, router_bias=True))
    with pytest.raises(ValueError, match="router='softmax' has no DeepseekV3 equivalent"):
        hf.config_to_hf(softmax)


def test_expert_bias_is_state_not_parameter():
    with nnx.use_eager_sharding(False):  # shapes only: nothing is computed
        model = nnx.eval_shape(
            lambda: llmarch.Transformer(llmarch.presets.get("tiny-deepseek"), rngs=nnx.Rngs(0))
        )
    _, params, rest = nnx.split(model, nnx.Param, ...)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(rest)}
    assert names == {"runs.1.layers.ffn.bias_e"}
    assert not any("bias" in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(params))
    assert jax.tree.leaves(rest)[0].shape == (2, 8)  # [layers of the MoE run, E]
