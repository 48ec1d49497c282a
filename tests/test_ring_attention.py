"""Context parallelism: ring attention over the ``context`` mesh axis equals unsharded attention."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import export
from jax.sharding import NamedSharding, PartitionSpec

import llmarch
from kernels_pallas.flash_attention import attention_reference
from llmarch import axes, ops, sharding
from llmarch.layers import Attention, AttentionConfig, KVCache
from llmarch.ring_attention import context_size, ring_attention
from llmarch.train.config import TrainConfig
from llmarch.train.trainer import train

B, T = 2, 16


def _inputs(N, K, H, dtype, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32).astype(dtype)
    d_out = jax.random.normal(kd, (B, T, N, H), jnp.float32).astype(dtype)
    return q, k, v, d_out


def _masks(packed: bool, causal: bool, window=None):
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    masks = dict(q_positions=positions, kv_positions=positions, causal=causal, sliding_window=window)
    if packed:  # documents that straddle chunk boundaries (chunks of 4 on context=4, of 2 on 8)
        segments = jnp.array([[0] * 5 + [1] * 7 + [2] * 4, [0] * 3 + [1] * 13])
        masks.update(q_segment_ids=segments, kv_segment_ids=segments)
    return masks


def _value_and_grads(fn, q, k, v, d_out, masks):
    """``fn``'s output and the gradients of ``<out, d_out>`` in q, k, v (one VJP)."""
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **masks), q, k, v)
    return out, vjp(d_out)


CASES = {  # name: (N, K, H, packed, causal, window, skip_masked_blocks)
    "causal": (4, 4, 8, False, True, None, True),
    "noncausal": (4, 4, 8, False, False, None, True),
    "gqa": (4, 2, 8, False, True, None, True),
    "mqa_packed": (4, 1, 8, True, True, None, True),
    "packed_noncausal": (2, 1, 8, True, False, None, True),
    "window_noskip": (2, 2, 8, True, True, 6, False),
}


@pytest.mark.parametrize(
    "spec, case, dtype",
    [
        ("context=4,data=2", "causal", "float32"),
        ("context=4,data=2", "noncausal", "float32"),
        ("context=4,data=2", "gqa", "float32"),
        ("context=4,data=2", "mqa_packed", "float32"),
        ("context=8", "gqa", "float32"),
        ("context=8", "packed_noncausal", "float32"),
        ("context=8", "window_noskip", "float32"),
        ("context=4,data=2", "mqa_packed", "bfloat16"),
        ("context=8", "causal", "bfloat16"),
    ],
)
def test_ring_equals_unsharded(devices, spec, case, dtype):
    N, K, H, packed, causal, window, skip = CASES[case]
    dtype = jnp.dtype(dtype)
    q, k, v, d_out = _inputs(N, K, H, dtype)
    masks = _masks(packed, causal, window)
    ref_out, ref_grads = _value_and_grads(attention_reference, q, k, v, d_out, masks)
    mesh = sharding.make_mesh(spec)
    ring = jax.jit(
        lambda *a: _value_and_grads(
            lambda *x, **m: ring_attention(*x, **m, skip_masked_blocks=skip), *a, masks
        )
    )
    with sharding.use(mesh, "cp"):
        out, grads = ring(q, k, v, d_out)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == jnp.float32 else dict(atol=5e-2, rtol=5e-2)
    f32 = np.float32
    np.testing.assert_allclose(np.asarray(out, f32), np.asarray(ref_out, f32), **tol)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g, f32), np.asarray(r, f32), **tol, err_msg=name)


def test_ops_attention_takes_the_ring_only_under_context_rules(devices):
    q, k, v, _ = _inputs(4, 2, 8, jnp.float32)
    masks = _masks(packed=True, causal=True)
    ref = attention_reference(q, k, v, **masks)
    mesh = sharding.make_mesh("context=4,data=2")
    with sharding.use(mesh, "cp"):
        assert context_size() == 4
        jaxpr = str(jax.make_jaxpr(lambda *a: ops.attention(*a, **masks))(q, k, v))
        out = jax.jit(lambda *a: ops.attention(*a, **masks))(q, k, v)
    assert "ppermute" in jaxpr
    np.testing.assert_allclose(out, ref, atol=2e-5)
    with sharding.use(mesh, "dp"):  # a context axis that the rules do not use: plain attention
        assert context_size() == 1
        assert "ppermute" not in str(jax.make_jaxpr(lambda *a: ops.attention(*a, **masks))(q, k, v))
    with sharding.use(mesh, "cp"), pytest.raises(ValueError, match="not available for op='ring_attention'"):
        ops.attention(q, k, v, impl="pallas", **masks)


def test_compiled_ring_permutes_and_never_gathers(devices):
    """The compiled program, forward and backward, moves K/V by collective-permute and has no
    all-gather (a ring, not a gather of the sequence) and no all-reduce (each device decides
    alone whether a block is fully masked)."""
    q, k, v, d_out = _inputs(4, 2, 8, jnp.float32)
    masks = _masks(packed=True, causal=True)
    mesh = sharding.make_mesh("context=4,data=2")
    seq = NamedSharding(mesh, PartitionSpec("data", "context"))
    placed = jax.device_put((q, k, v, d_out), seq)
    masks = {name: jax.device_put(x, seq) if isinstance(x, jax.Array) else x for name, x in masks.items()}
    with sharding.use(mesh, "cp"):
        f = jax.jit(lambda *a: _value_and_grads(ops.attention, *a, masks))
        hlo = f.lower(*placed).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo and "all-reduce" not in hlo


def test_ring_lowers_for_tpu_and_cuda(devices):
    """No accelerator here: the sharded ring (forward and backward, bf16) must still lower for both."""
    mesh = sharding.make_mesh("context=4,data=2")
    seq = NamedSharding(mesh, PartitionSpec("data", "context"))
    shapes = [
        jax.ShapeDtypeStruct(shape, dtype, sharding=seq)
        for shape, dtype in [
            ((B, T, 4, 8), jnp.bfloat16),
            ((B, T, 2, 8), jnp.bfloat16),
            ((B, T, 2, 8), jnp.bfloat16),
            ((B, T), jnp.int32),
            ((B, T, 4, 8), jnp.bfloat16),
        ]
    ]

    def f(q, k, v, positions, d_out):
        masks = dict(q_positions=positions, kv_positions=positions)
        return _value_and_grads(ops.attention, q, k, v, d_out, masks)

    with sharding.use(mesh, "cp"):
        for platform in ("tpu", "cuda"):
            exported = export.export(jax.jit(f), platforms=[platform])(*shapes)
            assert "collective_permute" in exported.mlir_module(), platform


def test_bad_sequence_length(devices):
    q, k, v, _ = _inputs(4, 4, 8, jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(T - 2), (B, T - 2))
    with sharding.use(sharding.make_mesh("context=8"), "cp"):
        with pytest.raises(ValueError, match="query length 14 .* multiples of it"):
            ops.attention(q[:, :-2], k[:, :-2], v[:, :-2], q_positions=positions, kv_positions=positions)


def test_cache_under_context_parallelism_raises(devices):
    cfg = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8)
    layer = Attention(32, cfg, rngs=nnx.Rngs(0))
    x = jnp.ones((B, 4, 32))
    positions = jnp.broadcast_to(jnp.arange(4), (B, 4))
    cache = Attention.init_cache(cfg, B, 8, jnp.float32)
    with sharding.use(sharding.make_mesh("context=4,data=2"), "cp"):
        with pytest.raises(ValueError, match="decoding is not context-parallel"):
            layer(x, positions, cache=cache)
    out, cache = layer(x, positions, cache=cache)  # no mesh: decoding as before
    assert isinstance(cache, KVCache) and out.shape == x.shape


def test_mesh_and_rules(devices):
    mesh = sharding.make_mesh("context=4,data=2")
    assert mesh.axis_names == (*sharding.MESH_AXES, "context") and mesh.shape["context"] == 4
    assert sharding.make_mesh("data=8").axis_names == sharding.MESH_AXES  # unchanged without it
    assert sharding.parse_mesh_spec("context=4,data=2") == {"context": 4, "data": 2}
    for name in ("cp", "fsdp_cp"):
        table = dict(sharding.rules(name))
        assert table[axes.SEQ] == "context" and table[axes.BATCH] == ("data", "fsdp")
    assert dict(sharding.rules("fsdp_cp"))[axes.EMBED] == "fsdp"
    for name in ("dp", "fsdp", "tp", "fsdp_tp", "ep", "hybrid", "serve"):  # presets unchanged
        assert dict(sharding.rules(name))[axes.SEQ] is None
    spec = sharding.logical_to_spec(
        (axes.BATCH, axes.SEQ, axes.ACT_EMBED), sharding.rules("cp"), mesh.axis_names
    )
    assert spec == PartitionSpec(("data", "fsdp"), "context", None)


def _loss(graphdef, state, tokens, segment_ids):
    logits = nnx.merge(graphdef, state)(tokens[:, :-1], segment_ids=segment_ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(), logits


@pytest.mark.parametrize(
    "preset, spec, rules",
    [("tiny-dense", "context=4,data=2", "cp"), ("tiny-mla", "context=4,fsdp=2", "fsdp_cp")],
)
def test_transformer_with_context_parallelism_equals_one_device(devices, preset, spec, rules):
    cfg = llmarch.presets.get(preset)
    graphdef, state = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, cfg.vocab_size)
    segment_ids = jnp.array([[0] * 6 + [1] * 10, [0] * 16, [0] * 3 + [1] * 3 + [2] * 10, [0] * 15 + [1]])
    grad = jax.jit(jax.value_and_grad(_loss, argnums=1, has_aux=True), static_argnums=0)
    (ref_loss, ref_logits), ref_grads = grad(graphdef, state, tokens, segment_ids)

    mesh = sharding.make_mesh(spec)
    with sharding.use(mesh, rules):
        placed = sharding.shard_state(state, mesh, rules)
        batch = jax.device_put((tokens, segment_ids), sharding.batch_sharding(mesh, rules))
        jaxpr = jax.make_jaxpr(_loss, static_argnums=0)(graphdef, placed, *batch)
        (loss, logits), grads = grad(graphdef, placed, *batch)
    assert "ppermute" in str(jaxpr)  # the model's attention ran as a ring
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
        jax.tree.leaves(grads),
        jax.tree.leaves(ref_grads),
    )


def test_training_with_context_parallelism_matches_one_device(devices, tmp_path):
    small = dict(
        seq_len=32, batch_size=8, steps=2, eval_every=1000, log_every=1, progress=False, tensorboard=False
    )
    one = train(TrainConfig(out_dir=str(tmp_path / "one"), **small), log=lambda s: None)
    cp = train(
        TrainConfig(out_dir=str(tmp_path / "cp"), mesh="context=4,data=2", rules="fsdp_cp", **small),
        log=lambda s: None,
    )
    np.testing.assert_allclose(list(cp.losses.values()), list(one.losses.values()), rtol=2e-5)
