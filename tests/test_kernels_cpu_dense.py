"""The float32 decode-step matmul (``kernels_cpu.dense_matmul``, C++ through XLA's FFI) against
``x @ w`` in float64, its gradient, its determinism, and its dispatch from
``llmarch.layers.einsum.contract`` through ``llmarch.ops.weight_matmul`` (with the kernels turned
off, contract stays on XLA: ``test_kernels_cpu.test_turned_off_kernels_fall_back_to_xla``).

Shapes cover one band and several (bands of >= 64 weight rows, the last one ragged), rows of
fewer than the kernel's 8-row passes, and N over its 2048-column slices. Tolerance: float32,
2e-5 of the largest expected magnitude (only the summation order differs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels_cpu import needs_kernels

from kernels_cpu import dense_matmul as cd
from llmarch import ops
from llmarch.layers.einsum import contract


def _operands(M, K, N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(M, K)).astype(np.float32), rng.normal(size=(K, N)).astype(np.float32)


def _assert_close(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)


@needs_kernels
@pytest.mark.parametrize(
    "M,K,N",
    [(1, 5, 7), (1, 512, 1000), (3, 70, 33), (8, 1408, 512), (2, 600, 2100), (8, 130, 4100), (1, 63, 1)],
)
def test_dense_matmul_matches_float64(M, K, N):
    x, w = _operands(M, K, N)
    got = jax.jit(cd.dense_matmul)(jnp.asarray(x), jnp.asarray(w))
    _assert_close(got, x.astype(np.float64) @ w.astype(np.float64))


@needs_kernels
@pytest.mark.parametrize("M,K,N", [(9, 70, 33), (16, 1408, 512), (40, 256, 100), (64, 37, 1), (23, 600, 65)])
def test_register_tiles_match_float64(M, K, N):
    """Past 8 rows: tiles of 8 rows (and a ragged last one) x 32 columns (and a ragged last
    panel), w's rows prefetched ahead (K past and short of the prefetch distance), K in passes
    of 256 (one, several, a ragged last)."""
    x, w = _operands(M, K, N, seed=M)
    got = jax.jit(cd.dense_matmul)(jnp.asarray(x), jnp.asarray(w))
    _assert_close(got, x.astype(np.float64) @ w.astype(np.float64))
    # A row's bits do not depend on the other rows (each output is one panel's, summed over k in order).
    again = jax.jit(cd.dense_matmul)(jnp.asarray(x[M - 9 :]), jnp.asarray(w))
    assert np.array_equal(np.asarray(again), np.asarray(got)[M - 9 :])


@needs_kernels
def test_dense_matmul_is_deterministic_and_differentiable():
    x, w = (jnp.asarray(a) for a in _operands(4, 700, 300, seed=1))
    f = jax.jit(cd.dense_matmul)
    first = np.asarray(f(x, w))
    for _ in range(5):  # bands may run on any thread in any order; the result's bits may not change
        assert np.array_equal(np.asarray(f(x, w)), first)
    loss = lambda fn: lambda x, w: jnp.sum(jnp.sin(fn(x, w)))  # noqa: E731
    got = jax.grad(loss(cd.dense_matmul), argnums=(0, 1))(x, w)
    want = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        _assert_close(g, r)


@needs_kernels
def test_dense_matmul_in_loops_and_vmap():
    """Inside a while loop (the engine's multi-step decode), a scan, and vmap (one call per row)."""
    x, w = (jnp.asarray(a) for a in _operands(2, 96, 600, seed=2))
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    body = lambda i, acc: acc + cd.dense_matmul(x, w)  # noqa: E731
    _assert_close(jax.jit(lambda: jax.lax.fori_loop(0, 3, body, jnp.zeros((2, 600))))(), 3 * want)
    ys = jax.jit(
        lambda: jax.lax.scan(lambda c, xi: (c, cd.dense_matmul(xi, w)), 0, jnp.stack([x, 2 * x]))[1]
    )()
    _assert_close(ys[1], 2 * want)
    _assert_close(jax.jit(jax.vmap(lambda r: cd.dense_matmul(r, w)))(x[:, None]).reshape(2, 600), want)


def _uses_kernel(fn, *args) -> bool:
    return "llmarch_dense_matmul" in jax.jit(fn).lower(*args).as_text()


@needs_kernels
def test_contract_sends_decode_rows_to_the_kernel_and_the_rest_to_xla():
    w_dnh = jnp.ones((16, 4, 8))
    w_nhd = jnp.ones((4, 8, 16))
    assert _uses_kernel(lambda x: contract("BTD,DNH->BTNH", x, w_dnh), jnp.ones((2, 1, 16)))
    assert _uses_kernel(lambda x: contract("BTD,DNH->BTNH", x, w_dnh), jnp.ones((1, 1, 16)))  # one row
    assert _uses_kernel(lambda x: contract("BTNH,NHD->BTD", x, w_nhd), jnp.ones((2, 4, 4, 8)))  # 8 rows
    assert _uses_kernel(lambda x: contract("BTD,DNH->BTNH", x, w_dnh), jnp.ones((8, 5, 16)))  # 40: tiles
    assert not _uses_kernel(lambda x: contract("BTD,DNH->BTNH", x, w_dnh), jnp.ones((5, 13, 16)))  # 65
    big = jax.ShapeDtypeStruct((1024, 1025), jnp.float32)  # past TILED_MAX_BYTES: 9 rows stay on XLA
    assert not _uses_kernel(lambda x, w: contract("BTD,DF->BTF", x, w), jnp.ones((3, 3, 1024)), big)
    assert _uses_kernel(lambda x, w: contract("BTD,DF->BTF", x, w), jnp.ones((2, 4, 1024)), big)  # 8 rows
    at_most = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)  # 4 MB: tiles
    assert _uses_kernel(lambda x, w: contract("BTD,DF->BTF", x, w), jnp.ones((3, 3, 1024)), at_most)
    bf16 = jnp.ones((1, 1, 16), jnp.bfloat16)
    assert not _uses_kernel(lambda x: contract("BTD,DNH->BTNH", x, w_dnh.astype(x.dtype)), bf16)
    # Not [M, K] @ [K, N] up to bitcasts (the weight's contracted axis is not its first): XLA.
    assert not _uses_kernel(lambda x: contract("BTD,ND->BTN", x, jnp.ones((8, 16))), jnp.ones((2, 1, 16)))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 2, 4, 8)).astype(np.float32))
    w = jnp.asarray(np.random.default_rng(5).normal(size=(4, 8, 16)).astype(np.float32))
    _assert_close(contract("BTNH,NHD->BTD", x, w), jnp.einsum("BTNH,NHD->BTD", x, w))


@needs_kernels
def test_sharded_programs_stay_on_xla():
    """The FFI call is opaque to the partitioner: under a mesh of several devices, XLA's dot."""
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        assert not _uses_kernel(lambda x: contract("BTD,DF->BTF", x, jnp.ones((16, 8))), jnp.ones((2, 1, 16)))


def test_impl_cpu_rejects_what_the_kernel_does_not_take():
    with pytest.raises(ValueError, match="impl='cpu' cannot take this weight_matmul"):
        ops.weight_matmul(jnp.ones((65, 16)), jnp.ones((16, 4)), impl="cpu")
    with pytest.raises(ValueError, match="impl='cpu' cannot take this weight_matmul"):
        ops.weight_matmul(jnp.ones((1, 16), jnp.bfloat16), jnp.ones((16, 4), jnp.bfloat16), impl="cpu")


@needs_kernels
def test_dense_matmuls_one_call_for_weights_sharing_x():
    """Several weights in one call: each result the same bits as its own call, the gradient
    XLA's, and the errors of a bad call named before any compilation."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(2, 600)).astype(np.float32))
    ws = [jnp.asarray(rng.normal(size=(600, n)).astype(np.float32)) for n in (512, 100, 2100)]
    ys = jax.jit(cd.dense_matmuls)(x, ws)
    for y, w in zip(ys, ws, strict=True):
        assert np.array_equal(np.asarray(y), np.asarray(jax.jit(cd.dense_matmul)(x, w)))
        _assert_close(y, np.asarray(x, np.float64) @ np.asarray(w, np.float64))
    # A loss linear in each y (sin would amplify the last bits in which the two sums differ).
    c = [jnp.asarray(rng.normal(size=(2, w.shape[1])).astype(np.float32)) for w in ws]

    def loss(x, ws, product=None):
        ys = cd.dense_matmuls(x, ws) if product is None else [x @ w for w in ws]
        return sum(jnp.sum(ci * y) for ci, y in zip(c, ys, strict=True))

    want = jax.grad(lambda x, ws: loss(x, ws, jnp.dot), argnums=(0, 1))(x, ws)
    got = jax.grad(loss, argnums=(0, 1))(x, ws)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        _assert_close(g, r)
    with pytest.raises(ValueError, match="ws is empty"):
        cd.dense_matmuls(x, [])
    with pytest.raises(ValueError, match=r"must be \[M, K\] and \[K, N\]"):
        cd.dense_matmuls(x, [ws[0], jnp.ones((599, 4))])
    with pytest.raises(ValueError, match="ws is empty"):
        ops.weight_matmuls(x, [])


@needs_kernels
def test_apply_shared_fuses_plain_einsums_and_leaves_the_rest():
    """q, k and v (or gate and up) of a decode step: one kernel call, the same values as each
    layer alone; LoRA-adapted, quantized or FP8 layers, and prefill rows, take their own path."""
    from flax import nnx

    import llmarch
    from llmarch.layers.einsum import Einsum, apply_shared

    a = Einsum((16, 4, 8), (None, None, None), rngs=nnx.Rngs(0))
    b = Einsum((16, 2, 8), (None, None, None), rngs=nnx.Rngs(1))
    calls = [(a, "BTD,DNH->BTNH"), (b, "BTD,DKH->BTKH")]
    x = jnp.asarray(np.random.default_rng(7).normal(size=(1, 1, 16)).astype(np.float32))
    text = jax.jit(lambda x: apply_shared(x, calls)).lower(x).as_text()
    assert text.count("llmarch_dense_matmul") == 1
    for y, (layer, eqn) in zip(apply_shared(x, calls), calls, strict=True):
        assert np.array_equal(np.asarray(y), np.asarray(layer(eqn, x)))
    prefill = jnp.ones((2, 33, 16))  # 66 rows: XLA's GEMM, each layer alone
    assert "llmarch_dense_matmul" not in jax.jit(lambda x: apply_shared(x, calls)).lower(prefill).as_text()
    cfg = llmarch.presets.get("tiny-dense")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    text = jax.jit(lambda m, t: m(t)).lower(model, jnp.zeros((1, 1), jnp.int32)).compile().as_text()
    # Per block: q/k/v, the output, gate/up, down; then the LM head.
    assert text.count("llmarch_dense_matmul") == 4 * cfg.num_layers + 1
    seen = []
    original = Einsum.__call__
    Einsum.__call__ = lambda self, eqn, x: (seen.append(eqn), original(self, eqn, x))[1]
    try:  # a tool wrapping Einsum.__call__ (quant targets, calibration, LoRA) sees every call
        apply_shared(x, calls)
    finally:
        Einsum.__call__ = original
    assert seen == [eqn for _, eqn in calls]
    a.fp8 = "tensor"  # not a plain Einsum product any more: its own path
    assert jax.jit(lambda x: apply_shared(x, calls)).lower(x).as_text().count("llmarch_dense_matmul") == 1
