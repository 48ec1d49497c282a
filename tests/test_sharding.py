import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import llmarch
from llmarch import sharding

LAYOUTS = [
    ("data=8", "dp"),
    ("data=2,fsdp=4", "fsdp"),
    ("data=4,tensor=2", "tp"),
    ("data=2,fsdp=2,tensor=2", "fsdp_tp"),
]


def _loss(graphdef, state, tokens):
    logits = nnx.merge(graphdef, state)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.fixture(scope="module")
def reference():
    cfg = llmarch.presets.get("tiny-gqa")
    graphdef, state = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, cfg.vocab_size)
    logits = nnx.merge(graphdef, state)(tokens[:, :-1])
    loss, grads = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(graphdef, state, tokens)
    return cfg, graphdef, state, tokens, logits, loss, grads


@pytest.mark.parametrize("spec, rules", LAYOUTS)
def test_layout_equals_single_device(devices, reference, spec, rules):
    cfg, graphdef, state, tokens, ref_logits, ref_loss, ref_grads = reference
    mesh = sharding.make_mesh(spec)
    with sharding.use(mesh, rules):
        born = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))  # built directly on the mesh
        sharded_graphdef, sharded_state = nnx.split(born)
        # Born sharded as the rules say, and identical to the single-device initialization.
        expected = sharding.state_shardings(sharded_state, mesh, rules)
        jax.tree.map(
            lambda v, s: v.sharding.is_equivalent_to(s, v.ndim) or pytest.fail(f"{v.sharding} != {s}"),
            sharded_state,
            expected,
        )
        jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(sharded_state), jax.tree.leaves(state))

        batch = jax.device_put(tokens, sharding.batch_sharding(mesh, rules))
        forward = jax.jit(lambda s, t: nnx.merge(sharded_graphdef, s)(t[:, :-1]))
        logits = forward(sharded_state, batch)
        loss, grads = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(
            sharded_graphdef, sharded_state, batch
        )
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
        jax.tree.leaves(grads),
        jax.tree.leaves(ref_grads),
    )


def test_shard_state_of_an_unsharded_model(devices, reference):
    _, graphdef, state, tokens, ref_logits, _, _ = reference
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    placed = sharding.shard_state(state, mesh, "fsdp_tp")
    w = placed["runs"][0]["layers"]["ffn"]["w_gate_df"]["w"].get_value()
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    with sharding.use(mesh, "fsdp_tp"):
        logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t[:, :-1]))(placed, tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5)


def test_logical_to_spec():
    table = sharding.rules("fsdp_tp")
    axes_ = ("data", "fsdp", "tensor", "expert", "stage")
    P = jax.sharding.PartitionSpec
    activation = sharding.logical_to_spec(("batch", "seq", "act_embed"), table, axes_)
    assert activation == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("embed", "mlp"), table, axes_) == P("fsdp", "tensor")
    # A mesh axis is used once per array: the second dimension asking for it is replicated.
    assert sharding.logical_to_spec(("mlp", "heads"), table, axes_) == P("tensor", None)
    with pytest.raises(ValueError, match="logical axis 'rows' has no rule"):
        sharding.logical_to_spec(("rows",), table, axes_)


def test_spec_axes_logical_axes_on_mesh_and_batch_axes(devices):
    assert sharding.spec_axes(None) == ()
    assert sharding.spec_axes("tensor") == ("tensor",)
    assert sharding.spec_axes(("data", "fsdp")) == ("data", "fsdp")
    assert sharding.logical_axes_on_mesh("batch") == ()  # no mesh, no rules: unsharded
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    assert sharding.logical_axes_on_mesh("batch", mesh, "fsdp_tp") == ("data", "fsdp")
    assert sharding.logical_axes_on_mesh("mlp", mesh, "fsdp_tp") == ("tensor",)
    assert sharding.logical_axes_on_mesh("expert", mesh, "fsdp_tp") == ()
    with sharding.use(mesh, "fsdp_tp"):  # the ambient mesh and rules
        assert sharding.logical_axes_on_mesh("embed") == ("fsdp",)
        assert sharding.batch_axes(8) == ("data", "fsdp")
        assert sharding.batch_axes(8, exclude="fsdp") == ("data",)
        assert sharding.batch_axes(6) == ()  # 2·2 rows do not divide 6: the batch stays whole
        assert sharding.batch_axes(6, exclude="fsdp") == ("data",)


def test_make_mesh_fills_missing_axes(devices):
    mesh = sharding.make_mesh("data=2,tensor=4")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4, "expert": 1, "stage": 1}


@pytest.mark.parametrize(
    "spec, match",
    [
        ("data=3", "needs 3 devices but 8"),
        ("batch=8", "mesh axis 'batch' is unknown"),
        ("data=two", "expected NAME=SIZE"),
        ("data", "expected NAME=SIZE"),
        ("data=2,data=4", "given twice"),
        ({"data": 0, "fsdp": 8}, "data=0"),
    ],
)
def test_bad_mesh_specs(devices, spec, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(spec)


def test_unknown_rules():
    with pytest.raises(ValueError, match="rules='zero3'"):
        sharding.rules("zero3")


def test_indivisible_layout_names_the_parameter(devices):
    cfg = llmarch.presets.get("tiny-gqa")  # 2 KV heads cannot split 8 ways
    mesh = sharding.make_mesh("tensor=8")
    with pytest.raises(ValueError, match=r"w_k_dkh.*size 2.*\('tensor',\)"):
        with sharding.use(mesh, "tp"):
            llmarch.Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "spec, count, fitted",
    [
        ("data=2,fsdp=2,tensor=2", 8, {"data": 2, "fsdp": 2, "tensor": 2}),
        ("data=2,fsdp=2,tensor=2", 4, {"data": 2, "fsdp": 2, "tensor": 1}),
        ("data=2,fsdp=2,tensor=2", 1, {"data": 1, "fsdp": 1, "tensor": 1}),
        ("data=2,fsdp=2,tensor=2", 16, {"data": 4, "fsdp": 2, "tensor": 2}),
        ("data=2,expert=4", 2, {"data": 2, "expert": 1}),
        ("expert=4", 6, {"expert": 6}),
        ("", 3, {"data": 3}),
    ],
)
def test_fit_mesh_spec_uses_exactly_the_devices_there_are(spec, count, fitted):
    got = sharding.fit_mesh_spec(spec, count)
    assert got == fitted and math.prod(got.values()) == count


def test_fit_mesh_spec_errors_and_default_count(devices):
    assert math.prod(sharding.fit_mesh_spec("tensor=2").values()) == len(devices)
    with pytest.raises(ValueError, match="device_count=0 is invalid"):
        sharding.fit_mesh_spec("data=2", 0)
    with pytest.raises(ValueError, match="mesh axis 'rows' is unknown"):
        sharding.fit_mesh_spec("rows=2", 2)
