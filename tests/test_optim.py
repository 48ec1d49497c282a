import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import llmarch
from llmarch.json_config import dataclass_from_dict
from llmarch.train.config import TrainConfig
from llmarch.train.optim import LrGroup, OptimizerConfig, build_optimizer, decay_mask, learning_rate_schedule
from llmarch.train.precision import Precision, policy
from llmarch.train.step import make_train_step

PARAMS = {"attn_norm": {"scale": jnp.ones(3)}, "ffn": {"w": jnp.ones((3, 2))}, "mem": {"values": jnp.ones(2)}}


def _apply(cfg, grads, params=PARAMS, steps=1, total=10):
    tx = build_optimizer(cfg, total)
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_weight_decay_skips_norms():
    zero = jax.tree.map(jnp.zeros_like, PARAMS)
    cfg = OptimizerConfig(name="sgd", learning_rate=0.1, weight_decay=0.5, schedule="constant")
    out = _apply(cfg, zero)
    np.testing.assert_allclose(out["attn_norm"]["scale"], 1.0)  # a norm: untouched
    np.testing.assert_allclose(out["ffn"]["w"], 1 - 0.1 * 0.5)  # a weight: decayed
    assert decay_mask(PARAMS) == {"attn_norm": {"scale": False}, "ffn": {"w": True}, "mem": {"values": True}}


def test_adamw_decay_is_decoupled_and_adam_decay_is_l2():
    zero = jax.tree.map(jnp.zeros_like, PARAMS)
    adamw = OptimizerConfig(name="adamw", learning_rate=0.1, weight_decay=0.5, schedule="constant")
    np.testing.assert_allclose(_apply(adamw, zero)["ffn"]["w"], 1 - 0.1 * 0.5, rtol=1e-6)
    adam = OptimizerConfig(name="adam", learning_rate=0.1, weight_decay=0.5, schedule="constant")
    # L2 through Adam's normalization: the first step moves by ~lr whatever the decay's size.
    np.testing.assert_allclose(_apply(adam, zero)["ffn"]["w"], 1 - 0.1, rtol=1e-4)


def test_lr_group_multiplier_and_its_decay():
    ones = jax.tree.map(jnp.ones_like, PARAMS)
    cfg = OptimizerConfig(
        name="sgd",
        learning_rate=0.1,
        schedule="constant",
        clip_norm=None,
        lr_groups=(LrGroup("mem/", 4.0, 1.0),),
    )
    out = _apply(cfg, ones, total=3)
    np.testing.assert_allclose(out["ffn"]["w"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(out["mem"]["values"], 1 - 0.4, rtol=1e-6)  # 4x at the start
    out = _apply(cfg, ones, steps=3, total=3)
    np.testing.assert_allclose(out["mem"]["values"], 1 - 0.1 * (4 + 3 + 2), rtol=1e-5)  # 4 -> 1


def test_gradient_accumulation_averages_micro_batches():
    cfg1 = OptimizerConfig(name="adamw", learning_rate=0.01, schedule="constant")
    cfg2 = OptimizerConfig(name="adamw", learning_rate=0.01, schedule="constant", grad_accum_steps=2)
    g1 = jax.tree.map(lambda x: 0.3 * jnp.ones_like(x), PARAMS)
    g2 = jax.tree.map(lambda x: -0.1 * jnp.ones_like(x), PARAMS)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    tx = build_optimizer(cfg2, 10)
    state = tx.init(PARAMS)
    params = PARAMS
    for g in (g1, g2):
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    expected = _apply(cfg1, mean, total=5)  # the same schedule over the 5 real updates
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, expected)


def test_schedules():
    cos = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1), 100)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(100)) == pytest.approx(0.1)
    const_cfg = OptimizerConfig(learning_rate=2.0, schedule="constant", warmup_steps=4)
    const = learning_rate_schedule(const_cfg, 100)
    assert float(const(2)) == pytest.approx(1.0) and float(const(50)) == 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "lamb"}, "name='lamb'"),
        ({"schedule": "linear"}, "schedule='linear'"),
        ({"learning_rate": 0.0}, "learning_rate=0.0"),
        ({"grad_accum_steps": 0}, "grad_accum_steps=0"),
        ({"clip_norm": -1.0}, "clip_norm=-1.0"),
        ({"min_lr_ratio": 2.0}, "min_lr_ratio=2.0"),
    ],
)
def test_bad_optimizer_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)
    with pytest.raises(ValueError, match="pattern"):
        LrGroup("(", 1.0)


def test_precision_policy_reaches_the_model():
    cfg = policy("bf16-logits").apply(llmarch.presets.get("tiny-dense"))
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    assert model.embed.table_vd[...].dtype == jnp.float32  # master weights stay float32
    assert model(jnp.zeros((1, 4), jnp.int32)).dtype == jnp.bfloat16
    pure = policy("pure-bf16").apply(llmarch.presets.get("tiny-dense"))
    assert llmarch.Transformer(pure, rngs=nnx.Rngs(0)).embed.table_vd[...].dtype == jnp.bfloat16
    # the FP8 policies' numerics are tested in test_fp8_training and test_fp8_delayed
    assert policy("fp8-delayed").fp8 == "delayed" and policy("fp8-delayed").compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match="precision='fp8-bogus' is unknown"):
        policy("fp8-bogus")
    with pytest.raises(ValueError, match="compute_dtype='int4'"):
        Precision(compute_dtype="int4")


def _legacy(name, **changes):
    """An ``optimizer`` object as train_config.json held it before the per-optimizer fields."""
    old = dict(
        name=name,
        learning_rate=0.003,
        schedule="cosine",
        warmup_steps=0,
        min_lr_ratio=0.1,
        weight_decay=0.0,
        clip_norm=1.0,
        momentum=0.9,
        b1=0.9,
        b2=0.95,
        eps=1e-08,
        grad_accum_steps=1,
        lr_groups=[],
    )
    return {**old, **changes}


def test_configs_written_before_the_per_optimizer_fields_still_load_with_their_meaning():
    def load(data):
        return dataclass_from_dict(OptimizerConfig, data)

    sgd = load(_legacy("sgd"))  # its stored momentum=0.9 was never used: still plain SGD
    assert sgd.momentum is None and sgd.resolved().momentum == 0.0 and sgd.b2 is None
    assert load(_legacy("momentum")).momentum == 0.9
    rms = load(_legacy("rmsprop"))  # its decay was b2
    assert (rms.alpha, rms.b2, rms.momentum, rms.eps) == (0.95, None, None, 1e-8)
    assert load(_legacy("adagrad")).initial_accumulator_value == 0.1  # the old built-in start
    adamw = load(_legacy("adamw", weight_decay=0.1))
    assert (adamw.b1, adamw.b2, adamw.eps, adamw.momentum, adamw.weight_decay) == (0.9, 0.95, 1e-8, None, 0.1)
    assert load(_legacy("adadelta")).eps == 1e-8 and load(_legacy("adadelta")).rho is None
    # Nested in a stored TrainConfig, as `llmarch train --out DIR` resumes and `eval` reads it.
    run = TrainConfig.from_dict({"out_dir": "x", "optimizer": _legacy("rmsprop")})
    assert run.optimizer.alpha == 0.95
    # What this version writes reads back as it is (it is not taken for an old file).
    new = OptimizerConfig(name="sgd", momentum=0.9, nesterov=True)
    assert load(json.loads(json.dumps(dataclasses.asdict(new)))) == new
    with pytest.raises(ValueError, match=r"b1=0.9 is invalid: rmsprop does not use it"):
        load({**_legacy("rmsprop"), "alpha": None})  # a hand-mixed file is validated as written


def test_float16_training_is_refused_with_the_field_and_bfloat16_named():
    with pytest.raises(
        ValueError, match=r"Precision.compute_dtype='float16' is invalid: .*loss scaling.*'bfloat16'"
    ):
        Precision(compute_dtype="float16")
    cfg = llmarch.presets.get("tiny-dense").replace(dtype="float16")
    graphdef, params, rest = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = optax.sgd(0.1)
    step = make_train_step(graphdef, tx)
    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"ModelConfig.dtype='float16' is invalid for training"):
        step(params, rest, tx.init(params), {"inputs": tokens, "targets": tokens})
