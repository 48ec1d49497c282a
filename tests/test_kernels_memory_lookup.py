"""Memory lookup (Pallas, interpret mode) against ``memory_lookup_reference``.

Both builds run in the interpreter (TPU: scalar-prefetched gathers and a sorted scatter;
GPU/Triton: pointer gathers and atomic adds), with small call/tile sizes so that the inputs
span several calls and tiles; plain (``memory_lookup``) and grouped (``memory_lookup_grouped``,
UltraMem's value expansion) reads. Tolerances, relative to the largest magnitude of the expected
array: float32 2e-5; bfloat16 1e-2 (float32 accumulation on both sides; the bf16 output is
rounded once).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import memory_lookup as ml

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2}
SMALL = ml.BlockSizes(picks_per_step=4, tokens_per_call=4, entries_per_call=24, block_b=4, block_d=8)


def assert_close(actual, expected, dtype, what=""):
    expected = np.asarray(expected, np.float32)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), expected, rtol=0, atol=TOL[dtype] * scale, err_msg=what
    )


def _inputs(M, D, B, J, dtype):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    table = jax.random.normal(k1, (M, D)).astype(dtype)
    idx = jax.random.randint(k2, (B, J), 0, M // 2)  # the upper half of the table is untouched
    idx = idx.at[0, :3].set(5).at[B - 1, 1].set(5)  # a row picked several times
    weights = jax.random.normal(k3, (B, J))
    return table, idx, weights, jax.random.normal(k4, (B, D))


def _reference(table, idx, weights, d_out):
    out, vjp = jax.vjp(lambda t, w: ml.memory_lookup_reference(t, idx, w), table, weights)
    return (out, *vjp(d_out.astype(out.dtype)))


def _grouped_reference(table, idx, weights, blocks, W, d_out):
    out, vjp = jax.vjp(lambda t, w: ml.memory_lookup_grouped_reference(t, idx, w, blocks, W), table, weights)
    return (out, *vjp(d_out.astype(out.dtype)))


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize("shape,W", [((50, 24, 7, 6), 1), ((16, 8, 4, 3), 1), ((50, 24, 7, 6), 3)])
def test_kernel_builds_match_reference(target, shape, W):
    """W=1: the plain lookup; W=3: the grouped one (each pick adds into one of W blocks)."""
    table, idx, weights, d_out = _inputs(*shape, jnp.float32)
    B, J = idx.shape
    blocks = None if W == 1 else jax.random.randint(jax.random.key(5), (B, J), 0, W)
    d_out = jnp.repeat(d_out[:, None], W, axis=1) * jnp.arange(1, W + 1)[None, :, None]  # [B,W,D]
    st = ml._Static(SMALL, True, W)
    out = jax.jit(lambda *a: ml._forward_call(st, target, True, *a))(table, idx, weights, blocks)
    d_table, d_weights = jax.jit(lambda *a: ml._backward_call(st, target, True, *a))(
        table, idx, weights, blocks, d_out
    )
    if W == 1:
        want = _reference(table, idx, weights, d_out[:, 0])
        want = (want[0][:, None], *want[1:])
    else:
        want = _grouped_reference(table, idx, weights, blocks, W, d_out)
    for name, a, b in zip(("out", "d_table", "d_weights"), (out, d_table, d_weights), want, strict=True):
        assert_close(a, b, jnp.float32, f"{target} {name}")
    np.testing.assert_array_equal(d_table[shape[0] // 2 :], 0)  # untouched rows stay zero


def test_grouped_public_wrapper_gradients():
    table, idx, weights, _ = _inputs(50, 24, 7, 6, jnp.float32)
    blocks = jax.random.randint(jax.random.key(6), idx.shape, 0, 4)
    d_out = jax.random.normal(jax.random.key(7), (7, 4, 24))

    def value_and_grads(fn, table, weights):
        out, vjp = jax.vjp(fn, table, weights)
        return (out, *vjp(d_out))

    got = jax.jit(
        lambda t, w: value_and_grads(
            lambda t, w: ml.memory_lookup_grouped(t, idx, w, blocks, 4, block_sizes=SMALL, interpret=True),
            t,
            w,
        )
    )(table, weights)
    want = _grouped_reference(table, idx, weights, blocks, 4, d_out)
    for name, a, b in zip(("out", "d_table", "d_weights"), got, want, strict=True):
        assert_close(a, b, jnp.float32, name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_memory_lookup_values_and_gradients(dtype):
    table, idx, weights, d_out = _inputs(50, 24, 7, 6, dtype)

    def value_and_grads(table, weights):
        out, vjp = jax.vjp(
            lambda t, w: ml.memory_lookup(t, idx, w, block_sizes=SMALL, interpret=True), table, weights
        )
        return (out, *vjp(d_out.astype(out.dtype)))

    got = jax.jit(value_and_grads)(table, weights)
    want = _reference(table.astype(jnp.float32), idx, weights, d_out)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for name, a, b in zip(("out", "d_table", "d_weights"), got, want, strict=True):
        assert_close(a, b, dtype, name)


def test_bad_inputs_raise():
    table, idx, weights, _ = _inputs(50, 24, 7, 6, jnp.float32)
    with pytest.raises(ValueError, match=r"indices span \[0, 50\]: the table has 50 rows"):
        ml.memory_lookup(table, idx.at[0, 0].set(50), weights)
    with pytest.raises(ValueError, match="indices has shape"):
        ml.memory_lookup(table, idx[:, :5], weights)
    with pytest.raises(ValueError, match="block_d=7 does not tile the table width D=24"):
        ml.memory_lookup(table, idx, weights, block_sizes=ml.BlockSizes(block_d=7), interpret=True)
    with pytest.raises(TypeError, match="indices has dtype float32"):
        ml.memory_lookup(table, idx.astype(jnp.float32), weights)
    with pytest.raises(ValueError, match=r"blocks span \[0, 4\]: num_blocks=4 allows \[0, 4\)"):
        ml.memory_lookup_grouped(table, idx, weights, jnp.full(idx.shape, 4).at[0, 0].set(0), 4)
