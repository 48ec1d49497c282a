"""Grouped matmul (gmm, tgmm; Pallas, interpret mode) against the references.

Both kernel builds run in the interpreter: the TPU one (scalar-prefetched work items,
resident output tiles) and the GPU/Triton one (pointer offsets, masked stores). Tolerances,
relative to the largest magnitude of the expected array: float32 2e-5; bfloat16 1e-2 (the
kernels accumulate in float32, the reference is float32 on the same bf16 inputs).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import grouped_matmul as gm

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2}
SMALL = gm.BlockSizes(block_m=8, block_k=8, block_n=8)

# (M, K, N, group_sizes): ragged groups with empty ones (first, middle, last), rows past the
# last group, sizes that are not multiples of the 8-blocks; and one exact case.
CASES = {
    "ragged": (37, 24, 20, (0, 7, 0, 13, 9, 3, 0)),
    "one_group_exact": (16, 16, 16, (16,)),
}


def assert_close(actual, expected, dtype, what=""):
    expected = np.asarray(expected, np.float32)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), expected, rtol=0, atol=TOL[dtype] * scale, err_msg=what
    )


def _inputs(case, dtype, transpose_rhs=False):
    M, K, N, sizes = CASES[case]
    E = len(sizes)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(k1, (M, K)).astype(dtype)
    rhs = jax.random.normal(k2, (E, N, K) if transpose_rhs else (E, K, N)).astype(dtype)
    return lhs, rhs, jnp.array(sizes, jnp.int32), jax.random.normal(k3, (M, N))


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize(
    "case,transpose_rhs", [("ragged", False), ("ragged", True), ("one_group_exact", False)]
)
def test_gmm_and_tgmm_kernels_match_reference(target, case, transpose_rhs):
    lhs, rhs, sizes, grad = _inputs(case, jnp.float32, transpose_rhs)
    st = gm._Static(transpose_rhs, SMALL, True)
    out = jax.jit(lambda a, b, g: gm._gmm_call(st, target, True, a, b, g, a.dtype))(lhs, rhs, sizes)
    assert_close(out, gm.gmm_reference(lhs, rhs, sizes, transpose_rhs=transpose_rhs), jnp.float32)
    t_out = jax.jit(lambda a, b, g: gm._tgmm_call(st, target, True, a, b, g, a.dtype))(lhs, grad, sizes)
    assert_close(t_out, gm.tgmm_reference(lhs, grad, sizes), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_values_and_gradients(dtype, transpose_rhs):
    lhs, rhs, sizes, grad = _inputs("ragged", dtype, transpose_rhs)
    kernel = functools.partial(
        gm.gmm, group_sizes=sizes, transpose_rhs=transpose_rhs, block_sizes=SMALL, interpret=True
    )
    reference = functools.partial(gm.gmm_reference, group_sizes=sizes, transpose_rhs=transpose_rhs)

    def value_and_grads(fn, *args):
        out, vjp = jax.vjp(fn, *args)
        return (out, *vjp(grad.astype(out.dtype)))

    got = jax.jit(functools.partial(value_and_grads, kernel))(lhs, rhs)
    want = value_and_grads(reference, lhs.astype(jnp.float32), rhs.astype(jnp.float32))
    assert got[0].dtype == dtype and got[2].dtype == dtype
    for name, a, b in zip(("out", "d_lhs", "d_rhs"), got, want, strict=True):
        assert_close(a, b, dtype, name)
    np.testing.assert_array_equal(got[0][32:], 0)  # rows past the last group
    np.testing.assert_array_equal(got[2][jnp.array([0, 2, 6])], 0)  # empty groups: zero gradient


def test_xla_op_equals_reference():
    lhs, rhs, sizes, grad = _inputs("ragged", jnp.float32)
    for t in (False, True):
        r = jnp.swapaxes(rhs, 1, 2) if t else rhs
        assert_close(
            gm.gmm_xla(lhs, r, sizes, transpose_rhs=t),
            gm.gmm_reference(lhs, r, sizes, transpose_rhs=t),
            jnp.float32,
        )


def test_bad_inputs_raise():
    lhs, rhs, sizes, _ = _inputs("ragged", jnp.float32)
    with pytest.raises(ValueError, match="rhs has 7 groups but group_sizes has 3"):
        gm.gmm(lhs, rhs, sizes[:3])
    with pytest.raises(ValueError, match=r"rhs.shape\[1\]=20 does not match"):
        gm.gmm(lhs, jnp.swapaxes(rhs, 1, 2), sizes)
    with pytest.raises(ValueError, match="sums to 43, more than lhs's 37 rows"):
        gm.gmm(lhs, rhs, sizes.at[0].set(11))
    with pytest.raises(ValueError, match="negative"):
        gm.gmm(lhs, rhs, sizes.at[0].set(-1))
    with pytest.raises(TypeError, match="group_sizes has dtype float32"):
        gm.gmm(lhs, rhs, sizes.astype(jnp.float32))
    with pytest.raises(ValueError, match="block_k=100 does not tile on TPU"):
        jax.eval_shape(
            lambda a, b, g: gm.gmm(a, b, g, block_sizes=gm.BlockSizes(128, 100, 128)),
            jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16),
            jax.ShapeDtypeStruct((4, 512, 512), jnp.bfloat16),
            jax.ShapeDtypeStruct((4,), jnp.int32),
        )
