"""Top-k selection on CPU (``kernels_cpu.top_k``, C++ through XLA's FFI) against ``jax.lax.top_k``,
its specification, bit for bit: values, indices, the order of ties, NaNs, infinities and signed
zeros; and its dispatch from ``llmarch.ops.top_k`` and the memory layers' searches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels_cpu import needs_kernels

from kernels_cpu import top_k as ck
from llmarch import ops
from llmarch.layers import memory_search as ms


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _rows(shape, seed=0, ties=False):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jnp.asarray(np.round(x * 4) / 4 if ties else x)  # rounded: many equal entries


@needs_kernels
@pytest.mark.parametrize(
    "shape,k",
    [
        ((7, 10), 3),
        ((64, 512), 32),
        ((3, 2, 1024), 32),
        ((5, 100), 100),
        ((4, 300), 80),
        ((33,), 1),
        ((6, 9), 0),
    ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_kernel_is_lax_top_k(shape, k, ties):
    x = _rows(shape, seed=len(shape) + k, ties=ties)
    _assert_same(jax.jit(lambda x: ck.top_k(x, k))(x), jax.lax.top_k(x, k))


@needs_kernels
def test_special_values_order_as_xla():
    x = jnp.array([[1.0, jnp.nan, 3.0, -jnp.nan, 3.0, -0.0, 0.0, -jnp.inf, jnp.inf, 1.0]])
    got = ck.top_k(x, 10)
    _assert_same(got, jax.lax.top_k(x, 10))
    assert got[1].tolist() == [[1, 8, 2, 4, 0, 9, 6, 5, 7, 3]]  # NaN, inf, 3, 3 (lower index first), ...


@needs_kernels
@pytest.mark.parametrize(
    "row",
    [
        np.arange(2048, dtype=np.float32),  # ascending: every entry beats the bar kept so far
        np.arange(2048, 0, -1).astype(np.float32),  # descending
        np.zeros(777, np.float32),  # all equal: the first k indices
        np.tile(np.array([5.0, -1.0, 5.0], np.float32), 100),
    ],
)
@pytest.mark.parametrize("k", [1, 64, 200])
def test_adversarial_rows(row, k):
    x = jnp.asarray(np.stack([row, row[::-1]]))
    _assert_same(ck.top_k(x, k), jax.lax.top_k(x, k))


@needs_kernels
def test_gradient_and_vmap_match_lax():
    x = _rows((4, 40), seed=5, ties=True)

    def loss(top):
        return lambda x: (top(x, 6)[0] ** 2 * jnp.arange(6.0)).sum()

    np.testing.assert_array_equal(jax.grad(loss(ck.top_k))(x), jax.grad(loss(jax.lax.top_k))(x))
    y = _rows((6, 3, 40), seed=6)
    _assert_same(jax.vmap(lambda r: ck.top_k(r, 4))(y), jax.lax.top_k(y, 4))
    by_column = jax.vmap(lambda r: ck.top_k(r, 4), in_axes=1)(y)
    _assert_same(by_column, jax.vmap(lambda r: jax.lax.top_k(r, 4), in_axes=1)(y))


@needs_kernels
def test_ops_top_k_dispatch():
    x = _rows((8, 64))

    def text(fn, arg=x):
        return jax.jit(fn).lower(arg).as_text()

    assert "llmarch_top_k" in text(lambda x: ops.top_k(x, 4))  # float32 on CPU: the kernel
    assert "llmarch_top_k" not in text(lambda x: ops.top_k(x, 4, impl="xla"))
    assert "llmarch_top_k" not in text(lambda x: ops.top_k(x, 4, impl="pallas"))  # XLA's TopK
    x16 = x.astype(jnp.bfloat16)
    assert "llmarch_top_k" not in text(lambda x: ops.top_k(x, 4), x16)  # not float32: XLA
    _assert_same(ops.top_k(x16, 4), jax.lax.top_k(x16, 4))
    with pytest.raises(ValueError, match="impl='cpu' cannot take this top_k"):
        ops.top_k(x16, 4, impl="cpu")


@pytest.mark.parametrize("k", [-1, 65, 2.0, True])
def test_ops_top_k_rejects_a_bad_k(k):
    with pytest.raises(ValueError, match=r"top_k: k=.* must be an int in \[0, 64\]"):
        ops.top_k(jnp.ones((2, 64)), k)


def test_ops_top_k_rejects_a_scalar():
    with pytest.raises(ValueError, match="x must have at least one axis"):
        ops.top_k(jnp.float32(1.0), 0)


@needs_kernels
def test_kernel_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must be float32"):
        ck.top_k(jnp.ones((2, 3), jnp.int32), 1)
    with pytest.raises(ValueError, match=r"k=4 must be in \[0, 3\]"):
        ck.top_k(jnp.ones((2, 3)), 4)


@needs_kernels
def test_memory_searches_take_the_kernel_and_agree_with_xla():
    """The UltraMem/PKM searches run their selections through ops.top_k: the same slots and
    scores under the kernel as under XLA's TopK (and, for PKM, as brute force)."""
    s_row, s_col = _rows((3, 2, 64), seed=7), _rows((3, 2, 64), seed=8)
    pkm = jax.jit(lambda a, b: ms.product_key_search(a, b, 8))
    assert "llmarch_top_k" in pkm.lower(s_row, s_col).as_text()
    got = pkm(s_row, s_col)
    _assert_same(got, ms.product_key_search(s_row, s_col, 8, impl="xla"))
    _assert_same(got, ms.brute_force_search(s_row, s_col, 8))
    r = jax.random.split(jax.random.key(0), 4)
    s_row, s_col = jax.random.normal(r[0], (3, 2, 64, 2)), jax.random.normal(r[1], (3, 2, 64, 2))
    cores, u = jax.random.normal(r[2], (2, 2, 2, 2)), jax.random.normal(r[3], (2, 2))
    _assert_same(
        jax.jit(lambda *a: ms.tucker_search(*a, 8))(s_row, s_col, cores, u, u),
        ms.tucker_search(s_row, s_col, cores, u, u, 8, impl="xla"),
    )
