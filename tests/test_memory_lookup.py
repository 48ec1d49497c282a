"""Value-table reads (llmarch.layers.memory_lookup): plain, MCS, IVE; sparse gradients; memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels_cpu import needs_kernels

from llmarch import ops
from llmarch.layers.memory_lookup import grouped_lookup, read_values, virtual_to_physical

M, U, B, J = 40, 12, 5, 6


def _inputs(X, W, seed=0):
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.normal(size=(M, U)), jnp.float32)
    rows = jnp.asarray(rng.integers(0, M // 2, size=(B, J)), jnp.int32)  # rows >= M/2 never picked
    weights = jnp.asarray(rng.normal(size=(B, J, X)), jnp.float32)
    blocks = jnp.asarray(rng.integers(0, W, size=(B, J)), jnp.int32) if W > 1 else None
    return table, rows, weights, blocks


def _reference(table, rows, weights, blocks, W):
    """The specification, densely: out[b,w, chunk c] = Σ_j [block=w]·weights[b,j,c]·table[row, chunk c]."""
    X = weights.shape[-1]
    picked = table[rows].reshape(B, J, X, U // X)  # [B,J,X,U/X]
    onehot = jax.nn.one_hot(jnp.zeros((B, J), jnp.int32) if blocks is None else blocks, W)
    return jnp.einsum("bjx,bjw,bjxu->bwxu", weights, onehot, picked).reshape(B, W, U)


@pytest.mark.parametrize("X,W", [(1, 1), (3, 1), (1, 4), (2, 4)])
def test_read_values_and_gradients_match_the_dense_specification(X, W):
    table, rows, weights, blocks = _inputs(X, W)
    got = read_values(table, rows, weights, blocks, W)
    np.testing.assert_allclose(got, _reference(table, rows, weights, blocks, W), rtol=1e-5, atol=1e-6)
    probe = jnp.asarray(np.random.default_rng(1).normal(size=(B, W, U)), jnp.float32)
    grads = jax.grad(lambda t, w: jnp.sum(read_values(t, rows, w, blocks, W) * probe), argnums=(0, 1))
    want = jax.grad(lambda t, w: jnp.sum(_reference(t, rows, w, blocks, W) * probe), argnums=(0, 1))
    for g, w in zip(grads(table, weights), want(table, weights), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    d_table = np.asarray(grads(table, weights)[0])
    untouched = np.setdiff1d(np.arange(M), np.asarray(rows))
    assert (d_table[untouched] == 0).all()  # only the picked rows get gradient
    assert (np.abs(d_table[np.unique(np.asarray(rows))]).sum(-1) > 0).all()


def test_plain_read_is_ops_memory_lookup():
    table, rows, weights, _ = _inputs(1, 1)
    np.testing.assert_allclose(
        read_values(table, rows, weights, None, 1)[:, 0],
        ops.memory_lookup(table, rows, weights[..., 0]),
        rtol=1e-6,
        atol=1e-6,  # on CPU the read is kernels_cpu.memory_read's: another summation order
    )
    assert ops.Impl.XLA in ops.available("memory_lookup_grouped")  # registered by memory_lookup


@needs_kernels
@pytest.mark.parametrize("X,W", [(1, 1), (3, 1), (1, 4), (2, 4)])
def test_cpu_kernel_read_equals_xla(X, W):
    """On CPU "auto" reads through kernels_cpu.memory_read (one FFI call, no [B,J,U] buffer); the
    same sums as the XLA read, out-of-range indices taken alike (negative rows count from the
    end, the rest clamp; a block outside [0, W) adds nothing), and "xla" keeps the FFI out."""
    table, rows, weights, blocks = _inputs(X, W, seed=7)
    rows = rows.at[0, :3].set(jnp.array([-1, M + 5, -M - 3], jnp.int32))
    if blocks is not None:
        blocks = blocks.at[1, :2].set(jnp.array([-1, W], jnp.int32))
    read = jax.jit(lambda *a, impl=None: read_values(*a, W, impl=impl), static_argnames="impl")
    assert "llmarch_memory_read" in read.lower(table, rows, weights, blocks).as_text()
    assert "llmarch_memory_read" not in read.lower(table, rows, weights, blocks, impl="xla").as_text()
    want = read(table, rows, weights, blocks, impl="xla")
    np.testing.assert_allclose(read(table, rows, weights, blocks), want, rtol=1e-5, atol=1e-6)
    if W > 1:  # a NaN stays in its pick's block (XLA's one-hot matmul spreads it to the whole row)
        nan_row = np.asarray(read(table, rows, weights.at[2, 0].set(jnp.nan), blocks)[2])  # [W,U]
        block = int(blocks[2, 0])
        assert np.isnan(nan_row[block]).all() and not np.isnan(np.delete(nan_row, block, 0)).any()
    b16 = table.astype(jnp.bfloat16)
    assert "llmarch_memory_read" not in read.lower(b16, rows, weights, blocks).as_text()  # XLA's read
    with pytest.raises(ValueError, match="impl='cpu' cannot take this memory read"):
        read_values(b16, rows, weights, blocks, W, impl="cpu")


@pytest.mark.parametrize("X,W", [(1, 1), (2, 4)])
def test_pallas_reads_equal_xla(X, W):
    """impl="pallas": the Pallas memory-lookup kernels (plain and grouped; interpreted on CPU)."""
    table, rows, weights, blocks = _inputs(X, W, seed=4)
    probe = jnp.asarray(np.random.default_rng(5).normal(size=(B, W, U)), jnp.float32)

    def loss(t, w, impl):
        return jnp.sum(read_values(t, rows, w, blocks, W, impl=impl) * probe)

    results = [jax.value_and_grad(loss, argnums=(0, 1))(table, weights, impl) for impl in ("xla", "pallas")]
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_grouped_lookup_custom_vjp_matches_autodiff():
    table, rows, weights, blocks = _inputs(1, 3, seed=2)
    w = weights[..., 0]

    def naive(t, w):
        return jnp.einsum("bj,bjw,bju->bwu", w, jax.nn.one_hot(blocks, 3), t[rows])

    probe = jnp.asarray(np.random.default_rng(3).normal(size=(B, 3, U)), jnp.float32)
    got = jax.grad(lambda t, w: jnp.sum(grouped_lookup(t, rows, w, blocks, 3) * probe), (0, 1))(table, w)
    want = jax.grad(lambda t, w: jnp.sum(naive(t, w) * probe), (0, 1))(table, w)
    for g, ww in zip(got, want, strict=True):
        np.testing.assert_allclose(g, ww, rtol=1e-5, atol=1e-5)


def test_virtual_to_physical_is_a_bijection_onto_rows_and_blocks():
    Wb, Mp = 4, 16
    perm = jax.random.permutation(jax.random.key(0), Wb * Mp).astype(jnp.int32)
    rows, blocks = virtual_to_physical(jnp.arange(Wb * Mp), perm, Mp)
    pairs = set(zip(np.asarray(rows).tolist(), np.asarray(blocks).tolist(), strict=True))
    assert pairs == {(r, b) for r in range(Mp) for b in range(Wb)}  # every (row, block) exactly once
    same, none = virtual_to_physical(jnp.arange(5), None, 5)
    assert none is None and (same == jnp.arange(5)).all()


@pytest.mark.parametrize("X,W", [(1, 1), (2, 4)])
def test_lookup_memory_does_not_grow_with_the_table(X, W):
    """Compiled forward+backward: temporaries are the same for a 16x larger table, and the only
    table-sized buffers are the table and its gradient (arguments and outputs)."""
    Bt, Jt, Ut = 32, 16, 64

    def compiled(rows_count):
        sds = jax.ShapeDtypeStruct
        args = (
            sds((rows_count, Ut), jnp.float32),
            sds((Bt, Jt), jnp.int32),
            sds((Bt, Jt, X), jnp.float32),
            sds((Bt, Jt), jnp.int32) if W > 1 else None,
        )
        f = jax.value_and_grad(
            lambda t, r, w, b: jnp.sum(jnp.sin(read_values(t, r, w, b, W))), argnums=(0, 2)
        )
        return jax.jit(f).lower(*args).compile().memory_analysis()

    small, large = compiled(2048), compiled(32768)
    assert large.temp_size_in_bytes == small.temp_size_in_bytes
    assert large.temp_size_in_bytes < 32768 * Ut * 4 / 8  # per-pick buffers, far below the table
    grow = large.output_size_in_bytes - small.output_size_in_bytes
    assert grow == (32768 - 2048) * Ut * 4  # the gradient of the table, nothing else
