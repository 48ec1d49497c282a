"""llmarch.hf against transformers' Qwen3ForCausalLM and Qwen3MoeForCausalLM: logits parity (GQA, an
explicit head_dim != hidden/heads, tied and untied embeddings, a sliding window, both norm_topk_prob
values, dense and sparse layers mixed), greedy decoding through the Engine, exports that transformers
loads as the same class, config round trips, and the errors for what llmarch cannot hold.

Every weight is random, the q/k norm scales included, so a missing or misplaced norm, a swapped
expert or a wrong renormalization changes the logits.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import accounting, hf
from llmarch.config import BlockConfig, ModelConfig, MoEConfig
from llmarch.layers.moe_routing import route

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_greedy import engine_and_transformers_greedy  # noqa: E402  (needs torch)

pytestmark = pytest.mark.hf

V, T = 128, 24
BASE = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# name -> (class, config fields): each a different corner of the mapping.
CASES = {
    "qwen3-gqa-untied": ("Qwen3", dict(num_hidden_layers=2, tie_word_embeddings=False)),
    "qwen3-mha-tied": (
        "Qwen3",
        dict(num_hidden_layers=2, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True),
    ),
    "qwen3-sliding": (
        "Qwen3",
        dict(
            num_hidden_layers=2,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=0,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3_moe-norm-tied": (
        "Qwen3Moe",
        dict(num_hidden_layers=2, norm_topk_prob=True, tie_word_embeddings=True, **MOE),
    ),
    "qwen3_moe-mixed": (
        "Qwen3Moe",
        dict(
            num_hidden_layers=3, norm_topk_prob=False, mlp_only_layers=[1], tie_word_embeddings=False, **MOE
        ),
    ),
}


def _randomize(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


def _torch_model(case):
    kind, fields = CASES[case]
    config = getattr(transformers, f"{kind}Config")(**{**BASE, **fields})
    return _randomize(getattr(transformers, f"{kind}ForCausalLM")(config))


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, V, (2, T)).astype(np.int32)


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    """``(case, transformers model, its checkpoint dir, llmarch model, cfg)``."""
    ref = _torch_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    model, cfg = hf.load_pretrained(path)
    return request.param, ref, path, model, cfg


def test_load_matches_transformers_logits(checkpoint):
    case, ref, _, model, cfg = checkpoint
    a = cfg.attention
    assert cfg.hf_model_type == case.split("-")[0]
    assert a.qk_norm and a.qk_norm_eps == cfg.norm_eps == 1e-5
    assert (a.num_kv_heads, a.head_dim) == ((4, 16) if case == "qwen3-mha-tied" else (2, 24))
    assert cfg.tie_embeddings == case.endswith("-tied")
    assert a.sliding_window == (8 if case == "qwen3-sliding" else None)
    if case.startswith("qwen3_moe"):
        assert cfg.moe.norm_topk == (case == "qwen3_moe-norm-tied")
        assert (cfg.moe.router, cfg.moe.aux_loss_coef, cfg.ffn_dim) == ("softmax", 0.001, 96)
        want = ["moe", "swiglu", "moe"] if case == "qwen3_moe-mixed" else ["moe", "moe"]
        assert [b.ffn for b in cfg.layer_blocks] == want
    tokens = _tokens()  # T=24 > the window of 8: the sliding case depends on it
    np.testing.assert_allclose(np.asarray(model(tokens)), _logits(ref, tokens), atol=1e-4)
    real = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert accounting.param_count(cfg) == real  # the q/k norms are counted


def test_router_gates_match_transformers():
    """llmarch's softmax router against Qwen3MoeTopKRouter, with and without renormalization."""
    hidden = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    for norm in (False, True):
        config = transformers.Qwen3MoeConfig(**{**BASE, **MOE}, norm_topk_prob=norm)
        router = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter(config)
        torch.nn.init.normal_(router.weight)
        with torch.no_grad():
            logits, gates, experts = (t.numpy() for t in router(torch.tensor(hidden)))
        cfg = hf.config_from_hf({**config.to_dict(), "num_hidden_layers": 1}).moe
        ours = route(jax.numpy.asarray(logits), None, cfg)
        np.testing.assert_array_equal(np.asarray(ours.experts), experts)
        np.testing.assert_allclose(np.asarray(ours.gates), gates, atol=1e-6)
        assert np.allclose(gates.sum(-1), 1) == norm


@pytest.mark.parametrize("case", ["qwen3-gqa-untied", "qwen3_moe-mixed"])
def test_engine_greedy_equals_transformers_generate(case, tmp_path):
    ref = _torch_model(case)
    ref.save_pretrained(tmp_path)
    model, cfg = hf.load_pretrained(tmp_path)
    ours, want = engine_and_transformers_greedy(model, cfg, ref, V, max_tokens=12)
    assert ours == want


def test_save_is_exact_and_transformers_loads_the_same_class(checkpoint, tmp_path):
    case, ref, _, model, cfg = checkpoint
    hf.save_pretrained(model, cfg, tmp_path)
    saved = json.loads((tmp_path / hf.CONFIG_FILE).read_text())
    assert saved["model_type"] == cfg.hf_model_type  # Qwen3 goes back out as Qwen3, not Llama
    loaded, loaded_cfg = hf.load_pretrained(tmp_path)
    assert loaded_cfg == cfg.replace(name=loaded_cfg.name)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    for p, var in nnx.to_flat_state(nnx.state(loaded)):
        assert np.array_equal(var.get_value(), flat[p].get_value()), p
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is type(ref)
    tokens = _tokens(1)
    np.testing.assert_allclose(_logits(again, tokens), _logits(ref, tokens), atol=1e-5)


# Configs -------------------------------------------------------------------------------------


def _qwen3_cfg(**overrides):
    attention = llmarch.AttentionConfig(
        num_heads=4, num_kv_heads=2, head_dim=24, rope_theta=1e6, qk_norm=True, qk_norm_eps=1e-6
    )
    kw = dict(vocab_size=V, d_model=64, num_layers=2, ffn_dim=96, attention=attention, norm_eps=1e-6)
    return ModelConfig(**{**kw, **overrides})


def test_config_round_trips():
    moe = MoEConfig(num_experts=4, top_k=2, expert_dim=32, norm_topk=False, aux_loss_coef=0.01)
    layouts = {
        ("moe", "moe", "moe", "moe"): (1, []),
        ("swiglu", "moe", "swiglu", "moe"): (2, []),
        ("moe", "swiglu", "swiglu", "moe"): (1, [1, 2]),
    }  # the plain step when one gives it
    for layout, (step, dense) in layouts.items():
        cfg = _qwen3_cfg(
            num_layers=4, moe=moe, blocks=tuple(BlockConfig(ffn=f) for f in layout), hf_model_type="qwen3_moe"
        )
        out = hf.config_to_hf(cfg)
        assert (out["decoder_sparse_step"], out["mlp_only_layers"]) == (step, dense)
        assert hf.config_from_hf(out, name=cfg.name) == cfg
        assert ModelConfig.from_json(cfg.to_json()) == cfg
    cfg = _qwen3_cfg()
    assert hf.config_to_hf(cfg)["model_type"] == "qwen3"  # chosen by the q/k norms
    assert hf.config_from_hf(hf.config_to_hf(cfg), name=cfg.name) == cfg.replace(hf_model_type="qwen3")
    window = _qwen3_cfg(attention=dataclasses.replace(cfg.attention, sliding_window=8))
    assert hf.config_from_hf(hf.config_to_hf(window), name=cfg.name).attention.sliding_window == 8
    tiny = llmarch.presets.get("tiny-dense")
    assert hf.config_to_hf(tiny)["model_type"] == "llama"
    assert hf.config_to_hf(tiny.replace(hf_model_type="llama"))["model_type"] == "llama"
    # Older run directories' configs have neither field: they load with the defaults.
    data = json.loads(tiny.to_json())
    del data["hf_model_type"], data["attention"]["qk_norm"], data["attention"]["qk_norm_eps"]
    assert ModelConfig.from_dict(data) == tiny


def test_qwen3_sparse_step_layout():
    config = {
        **hf.config_to_hf(_qwen3_cfg(num_layers=4, hf_model_type="qwen3")),
        "model_type": "qwen3_moe",
        **MOE,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
    }
    cfg = hf.config_from_hf(config)
    assert [b.ffn for b in cfg.layer_blocks] == ["swiglu", "moe", "swiglu", "swiglu"]
    assert cfg.moe.norm_topk is False and cfg.moe.aux_loss_coef == 0.001  # Qwen3MoeConfig's defaults


@pytest.fixture(scope="module")
def qwen3_config():
    return hf.config_to_hf(_qwen3_cfg())


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"attention_bias": True}, "attention_bias=True is not supported: llmarch projections have no bias"),
        (
            {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1, "layer_types": None},
            r"layer_types=\['full_attention', 'sliding_attention'\] is not supported.*allowed: all",
        ),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types=.* is not supported"),
        ({"layer_types": ["sliding_attention"] * 2}, "sliding layers need use_sliding_window=true"),
        ({"layer_types": ["full_attention"]}, "must list num_hidden_layers=2"),
        (
            {"model_type": "qwen2"},
            r"model_type='qwen2'.*allowed: 'llama'.*'qwen3' \(Qwen3ForCausalLM\), "
            r"'qwen3_moe' \(Qwen3MoeForCausalLM\)",
        ),
        ({"head_dim": 0}, "head_dim=0 is invalid: must be a positive integer"),
        (
            {"model_type": "qwen3_moe", **MOE, "use_sliding_window": True, "sliding_window": 8},
            "use_sliding_window=True is not supported for Qwen3-MoE",
        ),
        ({"model_type": "qwen3_moe", **MOE, "mlp_only_layers": [0, 1]}, "leaves no MoE layer"),
        ({"model_type": "qwen3_moe", **MOE, "mlp_only_layers": "0"}, "mlp_only_layers='0' is invalid"),
        ({"model_type": "qwen3_moe", **MOE, "num_experts": 0}, "num_experts=0 is not supported"),
    ],
    ids=lambda v: "-".join(f"{k}" for k in v) if isinstance(v, dict) else "",
)
def test_unsupported_qwen3_config_fields(qwen3_config, changes, match):
    with pytest.raises(ValueError, match=r"^config\.json .*" + match):
        hf.config_from_hf({**qwen3_config, **changes})


def test_absent_head_dim_takes_each_architectures_default(qwen3_config):
    config = {k: v for k, v in qwen3_config.items() if k != "head_dim"}
    assert hf.config_from_hf(config).attention.head_dim == 128  # Qwen3Config's default
    moe = hf.config_from_hf({**config, "model_type": "qwen3_moe", **MOE})
    assert moe.attention.head_dim == 16  # Qwen3MoeAttention: hidden_size // heads


def test_export_refuses_what_the_architecture_cannot_hold():
    cfg = _qwen3_cfg()
    with pytest.raises(ValueError, match="AttentionConfig.qk_norm=True has no Llama equivalent"):
        hf.config_to_hf(cfg, architecture="llama")
    plain = llmarch.presets.get("tiny-dense")
    with pytest.raises(ValueError, match="AttentionConfig.qk_norm=False has no Qwen3 equivalent"):
        hf.config_to_hf(plain.replace(hf_model_type="qwen3"))
    eps = cfg.replace(norm_eps=1e-5)
    with pytest.raises(ValueError, match="qk_norm_eps=1e-06 has no Qwen3 equivalent"):
        hf.config_to_hf(eps)
    with pytest.raises(ValueError, match=r"architecture='gpt2' is not supported; allowed: 'llama'"):
        hf.config_to_hf(cfg, architecture="gpt2")
    with pytest.raises(ValueError, match=r"ModelConfig.hf_model_type='gpt2' is not supported"):
        hf.config_to_hf(cfg.replace(hf_model_type="gpt2"))
    moe = cfg.replace(
        moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32), blocks=(BlockConfig(ffn="moe"),) * 2
    )
    with pytest.raises(
        ValueError,
        match=r"BlockConfig.ffn='moe' has no Qwen3ForCausalLM tensors "
        r"\(model_type 'qwen3'\); allowed: \['swiglu'\]",
    ):
        hf.config_to_hf(moe, architecture="qwen3")
    shared = moe.replace(moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32, num_shared_experts=1))
    with pytest.raises(ValueError, match="MoEConfig.num_shared_experts=1 has no Qwen3-MoE equivalent"):
        hf.config_to_hf(shared)
    with pytest.raises(ValueError, match="ModelConfig.hf_model_type='' is invalid"):
        cfg.replace(hf_model_type="")


def test_an_llmarch_model_saves_as_the_architecture_asked_for(tmp_path):
    cfg = _qwen3_cfg()
    graphdef, state = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    model = nnx.merge(
        graphdef, jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), state)
    )
    hf.save_pretrained(model, cfg, tmp_path, architecture="qwen3")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(ref).__name__ == "Qwen3ForCausalLM"
    tokens = _tokens(2)
    np.testing.assert_allclose(_logits(ref, tokens), np.asarray(model(tokens)), atol=1e-4)
