"""Row-sharded value tables on 8 simulated devices equal the unsharded lookup (values, gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import llmarch
from llmarch import presets, sharding
from llmarch.layers import memory as memory_lib
from llmarch.layers.memory_lookup import read_values
from llmarch.layers.memory_sharded import memory_axes, sharded_read_values
from llmarch.model import aux_loss


@pytest.mark.parametrize(
    "spec, rules, X, W",
    [
        ("tensor=8", "tp", 1, 1),
        ("data=2,tensor=4", "fsdp_tp", 2, 4),
        ("data=2,expert=4", "ep", 2, 1),
    ],
)
def test_sharded_read_equals_unsharded(devices, spec, rules, X, W):
    rng = np.random.default_rng(0)
    M, U, B, J = 64, 8, 8, 6
    table = jnp.asarray(rng.normal(size=(M, U)), jnp.float32)
    rows = jnp.asarray(rng.integers(0, M, size=(B, J)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(B, J, X)), jnp.float32)
    blocks = jnp.asarray(rng.integers(0, W, size=(B, J)), jnp.int32) if W > 1 else None
    probe = jnp.asarray(rng.normal(size=(B, W, U)), jnp.float32)

    def loss(read, t, w):
        return jnp.sum(read(t, rows, w, blocks, W) * probe)

    want = jax.value_and_grad(lambda t, w: loss(read_values, t, w), argnums=(0, 1))(table, weights)
    mesh = sharding.make_mesh(spec)
    with sharding.use(mesh, rules):
        axes_ = memory_axes()
        assert axes_ == (("expert",) if rules == "ep" else ("tensor",))
        placed = jax.device_put(table, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes_)))
        read = lambda *a: sharded_read_values(*a, mesh_axes=axes_)  # noqa: E731
        got = jax.jit(jax.value_and_grad(lambda t, w: loss(read, t, w), argnums=(0, 1)))(placed, weights)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert got[1][0].sharding.spec[0] == axes_[0]  # the table's gradient stays row-sharded


def test_sharded_ultramem_model_equals_single_device(devices, monkeypatch):
    cfg = presets.get("tiny-ultramem").replace(num_layers=1, skip_layers=((0, 0),))  # 1 block: fast compile
    graphdef, params, rest = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(1), (4, 9), 0, cfg.vocab_size)

    def loss(graphdef, params, rest, tokens):
        out = nnx.merge(graphdef, params, rest)(tokens[:, :-1], return_aux=True)
        logits, aux = out.logits, out.aux
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return ce + aux_loss(aux)

    step = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    want_loss, want_grads = step(graphdef, params, rest, tokens)
    calls = []
    real = memory_lib.sharded_read_values
    monkeypatch.setattr(
        memory_lib, "sharded_read_values", lambda *a, **k: calls.append(k["mesh_axes"]) or real(*a, **k)
    )
    mesh = sharding.make_mesh("data=2,tensor=4")
    with sharding.use(mesh, "tp"):
        placed, rest = sharding.shard_state(params, mesh, "tp"), sharding.shard_state(rest, mesh, "tp")
        values = placed["skips"][0]["values_mu"][...]
        assert values.sharding.spec[0] == "tensor"  # 1,024 rows: 256 per device
        batch = jax.device_put(tokens, sharding.batch_sharding(mesh, "tp"))
        got_loss, got_grads = step(graphdef, placed, rest, batch)
    assert calls == [("tensor",)]  # the lookup ran inside shard_map
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        jax.tree.leaves(got_grads),
        jax.tree.leaves(want_grads),
    )
