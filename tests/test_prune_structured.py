"""Structured pruning: heads (MHA, GQA, MQA, MLA), FFN channels and MoE experts removed from the
shapes. The smaller model equals the masked original (the same choice as zeros) on random tokens,
its config counts its parameters and survives JSON, and the importance criteria choose sensibly:
a dead head, channel or expert goes first, and calibration sees what weight norms cannot."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch.accounting import param_count
from llmarch.config import ModelConfig
from llmarch.prune import apply_structured, plan_structured, prune_structured, structured_mask

ROWS = np.random.default_rng(0).integers(0, 320, (8, 16)).astype(np.int32)  # calibration rows
TOKENS = ROWS[:2]


def _cfg(name: str, **attention) -> ModelConfig:
    cfg = llmarch.presets.get(name)
    return cfg.replace(attention=dataclasses.replace(cfg.attention, **attention)) if attention else cfg


def _deepseek_like() -> ModelConfig:
    """tiny-deepseek with 16 experts: 4 groups of 4, so a quarter of each group can go."""
    cfg = llmarch.presets.get("tiny-deepseek")
    return cfg.replace(moe=dataclasses.replace(cfg.moe, num_experts=16))


def _params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _model(cfg: ModelConfig, seed: int = 0):
    """A ``Transformer(cfg)`` with random weights (norm scales near 1, the rest N(0, 0.02²)),
    filled into its abstract shape: initializing compiles every new block shape, seconds each."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: llmarch.Transformer(cfg, rngs=nnx.Rngs(0))))
    filled = []
    for path, var in nnx.to_flat_state(state):
        x, near_one = var.get_value(), path[-1] == "scale"
        value = near_one + rng.normal(0.0, 0.1 if near_one else 0.02, x.shape)
        filled.append((path, var.replace(jnp.asarray(value, x.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _logits(model) -> np.ndarray:
    """``model(TOKENS)``, jitted: one compile is cheaper than the eager MLA/MoE forward's dispatches."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda state: nnx.merge(graphdef, state)(TOKENS))(state))


def _check(model, cfg, plan, removed_params: int):
    """The pruned model equals the masked one, counts as its config says, and round-trips."""
    small, small_cfg = apply_structured(model, cfg, plan)
    masked, masked_cfg = apply_structured(model, cfg, plan, mask=True)
    np.testing.assert_allclose(_logits(small), _logits(masked), atol=1e-5, rtol=1e-5)
    assert small_cfg is plan.cfg and small.cfg == small_cfg
    assert _params(small) == param_count(small_cfg) == param_count(cfg) - removed_params
    assert _params(masked) == _params(model)  # the mask keeps every shape
    assert ModelConfig.from_dict(json.loads(small_cfg.to_json())) == small_cfg
    return small, small_cfg


@pytest.mark.parametrize(
    "cfg, criterion",
    [
        (_cfg("tiny-dense"), "magnitude"),  # MHA: 4 heads, 4 KV heads
        (_cfg("tiny-gqa", num_heads=8, num_kv_heads=4, head_dim=8), "activation"),  # GQA, G=2
        (_cfg("tiny-dense", num_kv_heads=1), "activation"),  # MQA: query heads go, the KV head stays
    ],
    ids=["mha", "gqa", "mqa"],
)
def test_heads(cfg, criterion):
    a, D, L = cfg.attention, cfg.d_model, cfg.num_layers
    model = _model(cfg)
    plan = plan_structured(model, cfg, "heads", 0.5, calibration=ROWS, criterion=criterion)
    assert plan.criterion == criterion
    new = plan.cfg.attention
    assert new.head_dim == a.head_dim and new.num_heads % new.num_kv_heads == 0
    if a.num_kv_heads == 1:
        assert (new.num_heads, new.num_kv_heads) == (a.num_heads // 2, 1)
    else:  # whole groups: G unchanged
        assert (new.num_kv_heads, new.groups) == (a.num_kv_heads // 2, a.groups)
    gone_q, gone_kv = a.num_heads - new.num_heads, a.num_kv_heads - new.num_kv_heads
    _check(model, cfg, plan, removed_params=L * 2 * D * a.head_dim * (gone_q + gone_kv))
    for keep in plan.keep.values():  # [layers, kept], ascending
        assert keep.shape == (L, a.num_kv_heads // 2 if a.num_kv_heads > 1 else a.num_heads // 2)
        assert np.all(np.diff(keep, axis=1) > 0)


def test_mla_heads_and_experts_by_group_with_bias():
    cfg = _deepseek_like()  # MLA attention, a dense block, then MoE with a shared expert
    model = _model(cfg)
    bias = model.runs[1].layers.ffn.bias_e  # a live b_i, so its slicing shows in the routing
    bias.set_value(jax.random.normal(jax.random.key(1), bias[...].shape) * 0.05)
    D, m = cfg.d_model, cfg.moe

    plan = plan_structured(model, cfg, "heads", 0.5)  # magnitude
    assert plan.cfg.mla.num_heads == 2 and plan.cfg.attention == plan.cfg.mla.mha_baseline()
    # per head: W_UQ|W_QR Q·(H+R), W_UK|W_UV A·(H+H_v), W_O H_v·D; 2 heads of each of 3 layers
    _check(model, cfg, plan, removed_params=3 * 2 * (24 * 24 + 32 * 32 + 16 * D))

    plan = plan_structured(model, cfg, "experts", 0.25, calibration=ROWS)  # load, 1 of 4 per group
    assert plan.criterion == "load" and plan.cfg.moe.num_experts == 12
    keep = plan.keep["runs/1"]  # [2 layers, 12]: three of each group of four
    assert keep.shape == (2, 12) and np.all(keep.reshape(2, 4, 3) // 4 == np.arange(4)[None, :, None])
    small, _ = _check(model, cfg, plan, removed_params=2 * 4 * (D + 3 * D * m.expert_dim))
    np.testing.assert_array_equal(
        small.runs[1].layers.ffn.bias_e[...], np.take_along_axis(np.asarray(bias[...]), keep, axis=1)
    )


def test_channels_with_a_skip_swiglu():
    cfg = _cfg("tiny-dense").replace(skip_layers=((0, 1),), skip_kind="swiglu")  # skips are F wide too
    model = _model(cfg)
    plan = plan_structured(model, cfg, "channels", 0.25, calibration=ROWS)
    assert plan.criterion == "activation" and plan.cfg.ffn_dim == 144
    assert set(plan.keep) == {"runs/0", "skips/0"}
    _check(model, cfg, plan, removed_params=(cfg.num_layers + 1) * 3 * cfg.d_model * 48)


def test_experts_softmax_router():
    cfg = _cfg("tiny-moe")
    model = _model(cfg)
    plan = plan_structured(model, cfg, "experts", 0.5, calibration=ROWS, criterion="activation")
    assert plan.cfg.moe.num_experts == 4 and plan.cfg.moe.top_k == 2
    _, small_cfg = _check(model, cfg, plan, removed_params=2 * 4 * (64 + 3 * 64 * 128))
    assert not small_cfg.moe.router_bias  # only the masked model needs a bias


def test_public_functions_agree_and_save_load(tmp_path):
    cfg = _cfg("tiny-gqa", num_heads=8, num_kv_heads=4, head_dim=8)
    model = _model(cfg)
    small, small_cfg = prune_structured(model, cfg, "heads", 0.5, calibration=ROWS)
    masked, masked_cfg = structured_mask(model, cfg, "heads", 0.5, calibration=ROWS)
    assert masked_cfg == cfg
    np.testing.assert_allclose(_logits(small), _logits(masked), atol=1e-5, rtol=1e-5)
    llmarch.hf.save_pretrained(small, small_cfg, tmp_path)  # an ordinary model of its config
    loaded, loaded_cfg = llmarch.hf.load_pretrained(tmp_path)
    assert loaded_cfg.attention == small_cfg.attention
    np.testing.assert_allclose(_logits(loaded), _logits(small), atol=1e-6)


def test_dead_units_go_first():
    cfg = _cfg("tiny-gqa", num_heads=8, num_kv_heads=4, head_dim=8)
    model = _model(cfg)
    w_o = model.runs[0].layers.attention.w_o_nhd.w  # [L,N,H,D]: group 2 = query heads 4, 5
    w_o[...] = w_o[...].at[:, 4:6].set(0.0)
    for criterion in ("magnitude", "activation"):
        plan = plan_structured(model, cfg, "heads", 0.25, calibration=ROWS, criterion=criterion)
        assert all(2 not in row for row in plan.keep["runs/0"]), criterion

    model = _model(_cfg("tiny-dense"))
    w_down = model.runs[0].layers.ffn.w_down_fd.w  # [L,F,D]
    w_down[...] = w_down[...].at[:, 7].set(0.0)
    plan = plan_structured(model, model.cfg, "channels", 0.01, calibration=ROWS)  # 2 of 192
    assert all(7 not in row for row in plan.keep["runs/0"])


def test_calibration_sees_what_weights_cannot():
    # Layer 0's attention norm zeroes half the model width, and KV group 1 reads only that half,
    # with large weights: the largest by magnitude, yet it contributes nothing on real inputs.
    cfg = _cfg("tiny-gqa", num_heads=8, num_kv_heads=4, head_dim=8)
    model = _model(cfg)
    layer = model.runs[0].layers
    layer.attn_norm.scale[...] = layer.attn_norm.scale[...].at[0, :32].set(0.0)
    w_v = layer.attention.w_v_dkh.w  # [L,D,K,H]
    w_v[...] = w_v[...].at[0, :, 1].set(0.0).at[0, :32, 1].set(1.0)
    by_weights = plan_structured(model, cfg, "heads", 0.25, criterion="magnitude")
    by_data = plan_structured(model, cfg, "heads", 0.25, calibration=ROWS)
    assert 1 in by_weights.keep["runs/0"][0] and 1 not in by_data.keep["runs/0"][0]

    # An expert with large weights that routing never picks (b_i = -1e9): magnitude keeps it,
    # load removes it.
    cfg = _deepseek_like()
    model = _model(cfg)
    ffn = model.runs[1].layers.ffn
    for w in (ffn.w_gate_edf.w, ffn.w_up_edf.w, ffn.w_down_efd.w):
        w[...] = w[...].at[:, 5].multiply(10.0)
    ffn.bias_e[...] = ffn.bias_e[...].at[:, 5].set(-1e9)
    by_weights = plan_structured(model, cfg, "experts", 0.25, criterion="magnitude")
    by_load = plan_structured(model, cfg, "experts", 0.25, calibration=ROWS)
    assert all(5 in row for row in by_weights.keep["runs/1"])
    assert all(5 not in row for row in by_load.keep["runs/1"])


@pytest.mark.parametrize(
    "name, args, kwargs, match",
    [
        ("tiny-dense", ("heads", 0), {}, r"fraction=0 is invalid: must be in \(0, 1\)"),
        ("tiny-dense", ("heads", 1), {}, r"fraction=1 is invalid: must be in \(0, 1\)"),
        ("tiny-dense", ("heads", 1.5), {}, r"fraction=1.5 is invalid: must be in \(0, 1\)"),
        ("tiny-dense", ("heads", 0.9), {}, "removes 4, leaving none"),
        ("tiny-dense", ("heads", 0.1), {}, "removes none"),
        ("tiny-moe", ("experts", 0.85), {}, "fewer than MoEConfig.top_k=2"),
        ("tiny-deepseek", ("experts", 0.5), {}, ">= 2 experts per group"),
        ("tiny-dense", ("layers", 0.5), {}, "target='layers' is invalid"),
        ("tiny-dense", ("heads", 0.5), {"criterion": "best"}, "criterion='best' is invalid"),
        ("tiny-dense", ("heads", 0.5), {"criterion": "load"}, "criterion='load' applies to target='experts'"),
        ("tiny-dense", ("heads", 0.5), {"criterion": "activation"}, "needs calibration data"),
        ("tiny-dense", ("experts", 0.5), {}, "no MoE block"),
        ("tiny-pkm", ("heads", 0.5), {"calibration": ROWS[:3]}, "at least 8"),
    ],
)
def test_errors(name, args, kwargs, match):
    cfg = llmarch.presets.get(name)
    model = nnx.eval_shape(lambda: llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))  # errors come first
    with pytest.raises(ValueError, match=match):
        plan_structured(model, cfg, *args, **kwargs)


def test_masking_refuses_a_router_normalized_over_every_expert():
    cfg = _cfg("tiny-moe")
    cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, norm_topk=False))
    model = _model(cfg)
    prune_structured(model, cfg, "experts", 0.5)  # pruning itself is fine
    with pytest.raises(ValueError, match="norm_topk=False"):
        structured_mask(model, cfg, "experts", 0.5)
