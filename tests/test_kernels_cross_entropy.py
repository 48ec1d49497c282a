"""The fused cross entropy (Pallas builds in interpret mode, and the chunked XLA path) against
``cross_entropy_reference``: values ``(nll, lse)`` and gradients in ``x`` and ``w`` under random
cotangents for both outputs (the z-loss's ``lse`` included), both weight layouts.

Both kernel builds run in the interpreter (TPU: grid-accumulated ``dx`` and ``dW`` kernels; GPU:
one kernel with atomic adds), with small tiles so that tokens, vocabulary and width span several
tiles and none is a multiple of its tile (padding and masking run). The XLA path runs with chunks
that divide V, that do not (the last chunk overlaps), and that cover V (the plain formula).
Tolerances, relative to the largest magnitude of the expected array: float32 2e-5; bfloat16 2e-2
(both sides multiply in bfloat16 with float32 accumulation, in different orders).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import cross_entropy as ce

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
SMALL = ce.BlockSizes(block_b=16, block_v=32, block_d=16)


def assert_close(actual, expected, dtype, what=""):
    expected = np.asarray(expected, np.float32)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), expected, rtol=0, atol=TOL[dtype] * scale, err_msg=what
    )


def _inputs(B, D, V, dtype, transpose_w):
    k = jax.random.split(jax.random.key(B * 1000 + V), 5)
    x = jax.random.normal(k[0], (B, D)).astype(dtype)
    w = (jax.random.normal(k[1], (V, D)) * 2.0).astype(dtype)  # logits of scale ~10: a peaked softmax
    labels = jax.random.randint(k[2], (B,), 0, V).at[0].set(V - 1)  # the last (padded) tile's entry
    cotangents = (jax.random.normal(k[3], (B,)), jax.random.normal(k[4], (B,)))
    return x, (w.T if transpose_w else w), labels, cotangents


def _value_and_grads(fn, x, w, cotangents):
    out, vjp = jax.vjp(fn, x, w)
    return (*out, *vjp(cotangents))


def _reference(x, w, labels, cotangents, transpose_w):
    # Upcast first: the reference's float32 result is the target for both dtypes.
    fn = lambda x, w: ce.cross_entropy_reference(x, w, labels, transpose_w=transpose_w)  # noqa: E731
    return _value_and_grads(fn, x.astype(jnp.float32), w.astype(jnp.float32), cotangents)


NAMES = ("nll", "lse", "dx", "dw")
SHAPES = [(37, 24, 203), (16, 16, 32), (5, 40, 77)]  # (B, D, V): ragged, exactly one tile, tiny B


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_builds_match_reference(target, transpose_w, shape):
    x, w, labels, g = _inputs(*shape, jnp.float32, transpose_w)
    st = ce._Static(transpose_w, SMALL, True)
    nll, lse = jax.jit(lambda x, w: ce._forward_call(st, target, True, x, w, labels))(x, w)
    g_nll, g_lse = g
    dx, dw = jax.jit(
        lambda x, w: ce._backward_call(st, target, True, x, w, labels, lse, g_nll, g_nll + g_lse)
    )(x, w)
    want = _reference(x, w, labels, g, transpose_w)
    for name, a, b in zip(NAMES, (nll, lse, dx, dw), want, strict=True):
        assert_close(a, b, jnp.float32, f"{target} {name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose_w", [False, True])
def test_public_kernel_gradients(dtype, transpose_w):
    """The custom_vjp wrapper (interpreted), in both dtypes: gradients come back in the inputs'."""
    x, w, labels, g = _inputs(37, 24, 203, dtype, transpose_w)

    def fn(x, w):
        return ce.cross_entropy(x, w, labels, transpose_w=transpose_w, block_sizes=SMALL, interpret=True)

    got = _value_and_grads(fn, x, w, g)
    assert got[2].dtype == x.dtype and got[3].dtype == w.dtype
    for name, a, b in zip(NAMES, got, _reference(x, w, labels, g, transpose_w), strict=True):
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("chunk", [29, 64, 203, 4096])  # V=203: dividing, ragged (overlapping last), V, more
def test_xla_path_matches_reference(chunk, transpose_w, dtype):
    x, w, labels, g = _inputs(37, 24, 203, dtype, transpose_w)
    fn = lambda x, w: ce.cross_entropy_xla(x, w, labels, transpose_w=transpose_w, chunk=chunk)  # noqa: E731
    got = _value_and_grads(fn, x, w, g)
    for name, a, b in zip(NAMES, got, _reference(x, w, labels, g, transpose_w), strict=True):
        assert_close(a, b, dtype, f"chunk={chunk} {name}")


def test_xla_path_never_holds_the_logits():
    """Compiled memory: the chunked path's temporaries stay far below one [B,V] float32 array,
    which the reference needs several of (forward and backward)."""
    B, D, V, chunk = 512, 32, 16384, 1024
    x, w, labels, g = _inputs(B, D, V, jnp.float32, False)

    def temp_bytes(fn):
        def loss(x, w):
            nll, lse = fn(x, w)
            return jnp.sum(nll * g[0] + lse * g[1])

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = B * V * 4
    plain = temp_bytes(lambda x, w: ce.cross_entropy_reference(x, w, labels))
    chunked = temp_bytes(lambda x, w: ce.cross_entropy_xla(x, w, labels, chunk=chunk))
    assert plain >= logits_bytes, (plain, logits_bytes)
    # dW (V·D·4 = 2 MiB) and a few [B, chunk] blocks (2 MiB each); the logits are 32 MiB.
    assert chunked < logits_bytes / 3, (chunked, logits_bytes)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, w, y: ce.cross_entropy(x[0], w, y), r"x has shape .*expected rank 2"),
        (lambda x, w, y: ce.cross_entropy(x, w[:, :5], y), r"x has width 8 but w \(40, 5\)"),
        (lambda x, w, y: ce.cross_entropy(x, w, y[:3]), r"labels has shape \(3,\) but x has 6 tokens"),
        (lambda x, w, y: ce.cross_entropy(x, w, y + 40), r"labels span \[40, 45\].*\[0, 40\)"),
        (lambda x, w, y: ce.cross_entropy(x, w, y.astype(jnp.float32)), r"labels has dtype float32"),
        (lambda x, w, y: ce.cross_entropy(x, w.T, y, transpose_w=False), r"x has width 8 but w \(8, 40\)"),
        (lambda x, w, y: ce.cross_entropy(x, w, y, block_sizes=(16, 16)), r"block_sizes=.*BlockSizes"),
        (lambda x, w, y: ce.cross_entropy_xla(x, w, y, chunk=0), r"chunk=0 is invalid"),
        (lambda x, w, y: ce.BlockSizes(block_v=0), r"BlockSizes.block_v=0 is invalid"),
    ],
)
def test_bad_inputs_are_clear_errors(call, match):
    x = jnp.ones((6, 8))
    w = jnp.ones((40, 8))
    y = jnp.arange(6)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, w, y)


def test_tiles_a_target_rejects_fail_when_traced():
    x, w, labels, _ = _inputs(300, 24, 700, jnp.float32, False)
    st = ce._Static(False, ce.BlockSizes(block_b=100), False)
    with pytest.raises(ValueError, match=r"block_b=100 does not tile on TPU"):
        jax.eval_shape(lambda x, w: ce._forward_call(st, "tpu", False, x, w, labels), x, w)
    with pytest.raises(ValueError, match=r"block_b=100 does not tile on GPU"):
        jax.eval_shape(lambda x, w: ce._forward_call(st, "gpu", False, x, w, labels), x, w)
