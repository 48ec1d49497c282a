"""MoE layers on one device: routing against hand-written references, the three compute strategies
against each other (values and gradients), capacity drops, balancing losses, the aux-loss-free bias
through the train step and the trainer, configs, presets and accounting."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import llmarch
from llmarch import accounting
from llmarch.config import MoEConfig, moe_blocks
from llmarch.layers import moe_dispatch, moe_routing
from llmarch.layers.moe import MoE

D = 32


def _model_cfg(**moe):
    m = MoEConfig(**{**dict(num_experts=8, top_k=2, expert_dim=16), **moe})
    return llmarch.presets.get("tiny-dense").replace(d_model=D, moe=m, blocks=moe_blocks(2, 1), init_std=0.3)


def _layer(seed=0, **moe):
    layer = MoE(D, _model_cfg(**moe).moe, rngs=nnx.Rngs(seed), init_std=0.3)  # no model, no mesh
    if layer.bias_e is not None:  # a random bias, so that a routing that ignores it fails
        layer.bias_e[...] = 0.1 * jax.random.normal(jax.random.key(seed + 7), layer.bias_e.shape)
    return layer


def _x(B=4, T=8, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, D))


# Routing ---------------------------------------------------------------------------------------


def test_mixtral_gates_are_the_softmax_over_the_selected_logits():
    logits = jnp.array([[1.0, 3.0, 2.0, -1.0], [0.5, 0.1, 0.2, 4.0]])
    r = moe_routing.route(logits, None, MoEConfig(num_experts=4, top_k=2, expert_dim=8))
    np.testing.assert_array_equal(r.experts, [[1, 2], [3, 0]])
    np.testing.assert_allclose(r.gates[0], jax.nn.softmax(jnp.array([3.0, 2.0])), rtol=1e-6)
    np.testing.assert_allclose(r.gates[1], jax.nn.softmax(jnp.array([4.0, 0.5])), rtol=1e-6)


def _deepseek_reference(logits, bias, m):
    """DeepSeek-V3's routing written out per token in numpy (as its reference code does)."""
    s = 1 / (1 + np.exp(-logits))
    experts, gates = [], []
    for row in s:
        choice = row + bias
        groups = choice.reshape(m.n_group, -1)
        group_score = np.sort(groups, axis=1)[:, -2:].sum(1)
        kept = np.argsort(-group_score, kind="stable")[: m.topk_group]
        masked = np.full_like(choice, -np.inf).reshape(m.n_group, -1)
        masked[kept] = groups[kept]
        top = np.argsort(-masked.reshape(-1), kind="stable")[: m.top_k]
        g = row[top] / row[top].sum() * m.route_scale
        experts.append(top)
        gates.append(g)
    return np.array(experts), np.array(gates)


def test_deepseek_group_limited_routing_matches_reference():
    m = MoEConfig(
        num_experts=16,
        top_k=4,
        expert_dim=8,
        router="sigmoid",
        n_group=4,
        topk_group=2,
        route_scale=2.5,
        router_bias=True,
    )
    rng = np.random.default_rng(0)
    logits, bias = rng.normal(size=(64, 16)).astype(np.float32), rng.normal(0, 0.3, 16).astype(np.float32)
    r = moe_routing.route(jnp.asarray(logits), jnp.asarray(bias), m)
    experts, gates = _deepseek_reference(logits, bias, m)
    np.testing.assert_array_equal(np.asarray(r.experts), experts)
    np.testing.assert_allclose(np.asarray(r.gates), gates, rtol=1e-5)
    # The bias changes the choice but never the gate values of the chosen experts.
    unbiased = moe_routing.route(jnp.asarray(logits), None, m)
    assert (np.asarray(unbiased.experts) != experts).any()
    used = np.take_along_axis(1 / (1 + np.exp(-logits)), experts, 1)
    np.testing.assert_allclose(np.asarray(r.gates), used / used.sum(1, keepdims=True) * 2.5, rtol=1e-5)


# Compute strategies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "moe",
    [
        dict(),  # Mixtral: softmax top-2
        dict(
            router="sigmoid",
            n_group=4,
            topk_group=2,
            top_k=3,
            router_bias=True,
            num_shared_experts=1,
            route_scale=2.5,
        ),  # DeepSeek-V3
    ],
    ids=["mixtral", "deepseek"],
)
def test_strategies_agree_in_values_and_gradients(moe):
    layer = _layer(**moe)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = _x()
    cotangent = jax.random.normal(jax.random.key(5), x.shape)

    @jax.jit
    def run(params, x):
        def loss(params, x, strategy):
            y, aux = nnx.merge(graphdef, params, rest)(x, strategy=strategy)
            return jnp.sum(y * cotangent), (y, aux["dropped"])

        return {
            s: jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x, s)
            for s in ("dense", "dropless", "capacity")
        }

    # capacity_factor 1.25 may drop; E/k = the worst case for 8 experts and k <= 3 keeps everything
    layer.moe = MoEConfig(**{**layer.moe.__dict__, "capacity_factor": 8 / layer.moe.top_k})
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    out = run(params, x)
    (_, (ref, _)), ref_grads = out["dense"]
    for strategy in ("dropless", "capacity"):
        (_, (y, dropped)), grads = out[strategy]
        assert int(dropped) == 0
        np.testing.assert_allclose(y, ref, atol=1e-5, err_msg=strategy)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, ref_grads)


def _kept_reference(experts, capacity, num_experts):
    """Which (token, choice) assignments fit: first choices of all tokens first, in token order."""
    N, k = experts.shape
    used, keep = np.zeros(num_experts, int), np.zeros((N, k), bool)
    for j in range(k):
        for t in range(N):
            e = experts[t, j]
            keep[t, j] = used[e] < capacity
            used[e] += 1
    return keep


def test_capacity_drops_exactly_the_counted_assignments():
    layer = _layer(capacity_factor=0.5)
    x = _x(B=2, T=16).reshape(32, D)
    r = layer.route(x[None])
    experts, gates = r.experts[0], r.gates[0]
    capacity = moe_dispatch.capacity_of(32, 2, 8, 0.5)
    assert capacity == 4
    y, dropped = jax.jit(lambda x: layer.experts(x, experts, gates, strategy="capacity"))(x)
    keep = _kept_reference(np.asarray(experts), capacity, 8)
    assert int(dropped) == int((~keep).sum()) > 0
    # Dropped assignments contribute nothing: the dense path with their gates zeroed.
    want = moe_dispatch.dense_all_experts(x, experts, jnp.where(keep, gates, 0), layer.weights())
    np.testing.assert_allclose(y, want, atol=1e-5)


# Balancing ----------------------------------------------------------------------------------------


def test_balance_losses_by_hand():
    E = 4
    uniform = jnp.full((8, E), 1 / E)
    balanced = jnp.array([[0, 1], [2, 3]] * 4)
    assert float(moe_routing.balance_loss(balanced, uniform, E)) == pytest.approx(1.0)
    # All tokens on experts 0 and 1, which hold all the probability: f = (2, 2, 0, 0), P = (.5, .5, 0, 0).
    skewed = jnp.tile(jnp.array([0.5, 0.5, 0, 0]), (8, 1))
    assert float(moe_routing.balance_loss(jnp.array([[0, 1]] * 8), skewed, E)) == pytest.approx(2.0)
    # Sequence-wise: each sequence balanced on its own vs only the batch as a whole.
    rows = jnp.stack([jnp.array([[0, 1]] * 4), jnp.array([[2, 3]] * 4)])  # [B=2, T=4, k]
    probs = jnp.stack(
        [jnp.tile(jnp.array([0.5, 0.5, 0, 0]), (4, 1)), jnp.tile(jnp.array([0, 0, 0.5, 0.5]), (4, 1))]
    )
    assert float(moe_routing.balance_loss(rows, probs, E)) == pytest.approx(1.0)
    assert float(moe_routing.sequence_balance_loss(rows, probs, E)) == pytest.approx(2.0)
    logits = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    assert float(moe_routing.router_z_loss(logits)) == pytest.approx(
        (np.log(2) ** 2 + (1 + np.log(2)) ** 2) / 2, rel=1e-6
    )


def test_aux_loss_free_bias_update():
    bias = jnp.zeros((2, 4))
    load = jnp.array([[10.0, 2.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]])  # mean 5
    np.testing.assert_allclose(
        moe_routing.updated_bias(bias, load, 0.01), [[-0.01, 0.01, 0.01, 0.01], [0, 0, 0, 0]]
    )
    np.testing.assert_allclose(moe_routing.load_ratio(load), [2.0, 1.0])


def test_train_step_returns_the_updated_bias_and_load_metrics():
    from llmarch.train.step import make_train_step

    cfg = _model_cfg(router="sigmoid", router_bias=True, bias_update_rate=1e-3, seq_aux_loss_coef=0.1)
    graphdef, params, rest = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = optax.adam(1e-3)
    step = make_train_step(graphdef, tx, update_rest=True)
    tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, cfg.vocab_size)
    new_params, new_rest, _, m = step(
        params, rest, tx.init(params), {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    )
    load = np.asarray(m["expert_load"])  # [MoE layers, E]: fractions of the 2·16·k assignments
    assert load.shape == (1, 8)
    np.testing.assert_allclose(load.sum(1), 1.0, rtol=1e-6)
    delta = np.asarray(jax.tree.leaves(new_rest)[0] - jax.tree.leaves(rest)[0])
    np.testing.assert_allclose(delta, 1e-3 * np.sign(load.mean(1, keepdims=True) - load), atol=1e-9)
    np.testing.assert_allclose(m["load_ratio"], load.max(1) / load.mean(1), rtol=1e-6)
    assert float(m["aux_loss"]) >= 0.1 * 0.99  # the sequence-wise loss is >= 1 per unit weight
    assert bool(m["finite"]) and jax.tree.structure(new_params) == jax.tree.structure(params)


@pytest.mark.slow
def test_trainer_updates_the_bias_and_logs_the_load(tmp_path):
    from llmarch.train import metrics as metrics_lib
    from llmarch.train.config import TrainConfig
    from llmarch.train.trainer import train

    cfg = _model_cfg(num_experts=4, router_bias=True, bias_update_rate=0.01)
    run = dict(
        out_dir=str(tmp_path),
        model=cfg,
        seq_len=16,
        batch_size=4,
        eval_every=4,
        eval_batches=1,
        log_every=2,
        checkpoint_every=2,
        progress=False,
        tensorboard=False,
    )
    result = train(TrainConfig(**run, steps=4), log=lambda s: None)
    bias = np.asarray(jax.tree.leaves(result.rest)[0])
    assert np.abs(bias).max() > 0 and np.allclose(np.abs(bias) * 100 % 1, 0, atol=1e-4)  # k·γ steps
    record = [r for r in metrics_lib.read(tmp_path / "metrics.jsonl") if "load_ratio" in r][-1]
    assert record["load_ratio"] >= 1 and np.shape(record["expert_load"]) == (1, 4)  # [layers, E]
    assert "4" in {p.name for p in (tmp_path / "checkpoints").iterdir()}  # the state, rest included


# Configs, presets, accounting, decode traffic ----------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(top_k=9), r"MoEConfig.top_k=9 is invalid: must be <= num_experts=8"),
        (dict(n_group=3), r"MoEConfig.n_group=3 is invalid: must divide num_experts=8"),
        (dict(n_group=2, topk_group=3), r"topk_group=3 is invalid: must be <= n_group=2"),
        (dict(n_group=4, topk_group=1, top_k=3), r"top_k=3 is invalid: must be <= topk_group"),
        (dict(strategy="sparse"), r"strategy='sparse' is invalid: must be one of \('dropless'"),
        (dict(bias_update_rate=0.1), r"bias_update_rate=0.1 is invalid: must be 0 unless router_bias"),
        (dict(capacity_factor=0.0), r"capacity_factor=0.0"),
    ],
)
def test_bad_moe_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**dict(num_experts=8, top_k=2, expert_dim=16), **kw})


def test_moe_blocks_need_a_moe_config_and_round_trip_json():
    cfg = llmarch.presets.get("tiny-deepseek")
    assert llmarch.ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="ModelConfig.moe=None is invalid: must be a MoEConfig"):
        cfg.replace(moe=None)
    with pytest.raises(ValueError, match="first_k_dense_replace=5"):
        moe_blocks(3, 5)


def test_experts_must_divide_the_expert_mesh_axis(devices):
    cfg = _model_cfg(num_experts=6)
    mesh = llmarch.sharding.make_mesh("data=2,expert=4")
    with pytest.raises(ValueError, match=r"MoEConfig.num_experts=6 is invalid.*'expert' mesh axis size 4"):
        with llmarch.sharding.use(mesh, "ep"):
            llmarch.Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "name, total, active, rel",
    [
        ("mixtral-8x7b", 46.7e9, 12.9e9, 0.005),  # Mistral counts embeddings and lm_head
        ("deepseek-v3", 671e9, 37e9, 0.02),
        ("deepseek-v2-lite", 15.7e9, 2.4e9, 0.03),
    ],
)
def test_published_parameter_counts(name, total, active, rel):
    cfg = llmarch.presets.get(name)
    assert accounting.param_count(cfg) == pytest.approx(total, rel=0.005)
    counts = accounting.active_param_counts(cfg)
    # DeepSeek's activated counts leave out the input embedding (a lookup, not a matmul).
    measured = counts.total - (counts.embedding if name.startswith("deepseek") else 0)
    assert measured == pytest.approx(active, rel=rel)


def test_moe_flops_count_only_the_active_experts():
    cfg = llmarch.presets.get("tiny-moe")
    dense_equivalent = cfg.replace(moe=None, blocks=None, ffn_dim=2 * cfg.moe.expert_dim)
    router = cfg.num_layers * cfg.d_model * cfg.moe.num_experts
    assert accounting.train_flops_per_token(cfg, 64) == pytest.approx(
        accounting.train_flops_per_token(dense_equivalent, 64) + 6 * router
    )


def test_decode_traffic_formulas():
    np.testing.assert_allclose(
        accounting.expected_distinct_experts(8, 2, [1, 4, 64]), [2.0, 8 * (1 - 0.75**4), 8 * (1 - 0.75**64)]
    )
    assert moe_routing.distinct_experts(np.array([[0, 3], [3, 5]])) == 3
    assert accounting.expert_bytes_read(3, 64, 128, 2) == 3 * 3 * 64 * 128 * 2
