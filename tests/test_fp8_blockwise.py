"""DeepSeek-V3's FP8 recipe (``llmarch.quant.fp8_blockwise``) against a numpy model of it, bit for bit.

The numpy model below is written from the recipe (report §3.3.2 and the module docstring's exact
statement): tile/block amax, ``s = max(amax·fl(1/448), 2^-126)``, a multiplication by ``fl(1/s)``,
saturation and one round-to-nearest-even cast by ``ml_dtypes.float8_e4m3fn``; the product as
float32 pairwise sums of the exact e4m3 products per ``promote_every`` elements, each times
``xs·ws`` and added into a float32 accumulator in K order. Inputs hold an outlier channel, all-zero
tiles, values far beyond e4m3's range and tiny (normal float32) values. Last, per-tensor scaling
against blockwise scaling with a 1e4x-1e6x outlier channel: the reason the recipe is fine-grained.
"""

import time

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from llmarch.quant import fp8_blockwise as fb

F32 = np.float32


# --- the numpy model -----------------------------------------------------------------------------


def np_scale(amax):
    return np.maximum(amax.astype(F32) * F32(1 / 448), F32(np.finfo(F32).tiny))


def np_e4m3(v, s):
    return np.clip(v * (F32(1) / s), F32(-448), F32(448)).astype(ml_dtypes.float8_e4m3fn)


def np_quantize_tiles(x, tile=128):
    x = np.asarray(x, F32)
    xt = x.reshape(*x.shape[:-1], -1, tile)
    s = np_scale(np.abs(xt).max(axis=-1))
    return np_e4m3(xt, s[..., None]).reshape(x.shape), s


def np_quantize_blocks(w, b=128):
    w = np.asarray(w, F32)
    K, N = w.shape
    s = np.empty((K // b, N // b), F32)
    q = np.empty((K, N), ml_dtypes.float8_e4m3fn)
    for i in range(K // b):
        for j in range(N // b):
            blk = w[i * b : (i + 1) * b, j * b : (j + 1) * b]
            s[i, j] = np_scale(np.abs(blk).max())
            q[i * b : (i + 1) * b, j * b : (j + 1) * b] = np_e4m3(blk, s[i, j])
    return q, s


def np_tree_sum(p):
    """Sum over axis 1 of ``p [M, P, N]``: first half + second half until one row remains."""
    while p.shape[1] > 1:
        h = p.shape[1] // 2
        p = p[:, :h] + p[:, h:]
    return p[:, 0]


def np_matmul(xq, xs, wq, ws, promote_every=128, tile=128, block=128):
    x, w = np.asarray(xq, F32), np.asarray(wq, F32)
    M, K = x.shape
    acc = np.zeros((M, w.shape[1]), F32)
    for c in range(K // tile):
        scale = xs[:, c][:, None] * np.repeat(ws[c], block)[None, :]  # [M, N]
        for k0 in range(c * tile, (c + 1) * tile, promote_every):
            products = x[:, k0 : k0 + promote_every, None] * w[None, k0 : k0 + promote_every]
            acc = acc + np_tree_sum(products) * scale
    return acc


# --- inputs --------------------------------------------------------------------------------------


def hard_activations(M=8, K=256, seed=0):
    """Normal values, one 1e4x outlier channel, an all-zero tile, a 1e6x row and tiny values."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(M, K)).astype(F32)
    x[:, 7] *= 1e4  # outlier channel in the first tile of every row
    x[1, 128:] = 0.0  # an all-zero tile
    x[2] *= 1e6  # far beyond e4m3's 448 before scaling
    x[3, 130:250] *= 1e-30  # tiny, still normal float32 (1e-30 > 1.2e-38)
    x[4, :128] = 1e-30 * rng.normal(size=128)  # a whole tile of tiny values
    return x


def hard_weight(K=256, N=256, seed=1):
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(K, N)) * 0.05).astype(F32)
    w[128:, 128:] = 0.0  # an all-zero block
    w[:128, 128:] *= 1e5  # a block far beyond e4m3's range
    w[5, :128] *= 300.0  # an outlier input channel in one block
    return w


def assert_bits(actual, expected):
    np.testing.assert_array_equal(np.asarray(actual).view(np.uint8), np.asarray(expected).view(np.uint8))


# --- quantization --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_activation_tiles_match_numpy_model_bitwise(seed):
    x = hard_activations(seed=seed)
    q, s = fb.quantize_activation_tiles(jnp.asarray(x))
    q_ref, s_ref = np_quantize_tiles(x)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (8, 256) and s.shape == (8, 2)
    assert_bits(q, q_ref)
    np.testing.assert_array_equal(np.asarray(s), s_ref)
    assert np.asarray(s)[1, 1] == np.finfo(F32).tiny and not np.asarray(q, F32)[1, 128:].any()
    np.testing.assert_array_equal(
        np.asarray(fb.dequantize_activation_tiles(q, s)), np.asarray(q_ref, F32) * np.repeat(s_ref, 128, -1)
    )


def test_activation_tiles_keep_leading_axes_and_accept_bfloat16():
    x = jnp.asarray(hard_activations().reshape(2, 4, 256), jnp.bfloat16)
    q, s = fb.quantize_activation_tiles(x)
    q_ref, s_ref = np_quantize_tiles(np.asarray(x, F32))
    assert q.shape == (2, 4, 256) and s.shape == (2, 4, 2)
    assert_bits(q, q_ref)
    np.testing.assert_array_equal(np.asarray(s), s_ref)


@pytest.mark.parametrize("seed", [1, 2])
def test_weight_blocks_match_numpy_model_bitwise(seed):
    w = hard_weight(seed=seed)
    q, s = fb.quantize_weight_blocks(jnp.asarray(w))
    q_ref, s_ref = np_quantize_blocks(w)
    assert s.shape == (2, 2)
    assert_bits(q, q_ref)
    np.testing.assert_array_equal(np.asarray(s), s_ref)
    deq = np.asarray(fb.dequantize_weight_blocks(q, s))
    np.testing.assert_array_equal(deq, np.asarray(q_ref, F32) * np.kron(s_ref, np.ones((128, 128), F32)))


def test_round_trip_error_within_half_an_e4m3_ulp():
    """Values that land in e4m3's normal range (|x/s| >= 2^-6) come back within 2^-4 relative."""
    x = hard_activations()
    q, s = fb.quantize_activation_tiles(jnp.asarray(x))
    deq = np.asarray(fb.dequantize_activation_tiles(q, s))
    normal = np.abs(x) / np.repeat(np.asarray(s), 128, -1) >= 2.0**-6
    rel = np.abs(deq - x)[normal] / np.abs(x)[normal]
    assert normal.mean() > 0.7 and rel.max() <= 2.0**-4 * (1 + 1e-6)


def test_saturation_not_nan():
    q = fb.quantize_per_tensor(jnp.asarray([1e3, -5e3, 100.0]), 1.0)  # a stale (too small) scale
    np.testing.assert_array_equal(np.asarray(q, F32), [448.0, -448.0, 96.0])


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: fb.quantize_activation_tiles(jnp.zeros((4, 200))),
            r"x has shape \(4, 200\).*multiple of 128",
        ),
        (lambda: fb.quantize_activation_tiles(jnp.float32(1.0)), "x has shape"),
        (lambda: fb.quantize_weight_blocks(jnp.zeros((256, 100))), r"output axis N \(100\)"),
        (lambda: fb.quantize_weight_blocks(jnp.zeros((2, 256, 256))), r"\[K, N\] matrix"),
        (lambda: fb.delayed_scale(jnp.zeros((2, 3))), "amax_history"),
    ],
)
def test_shape_errors_are_one_line_value_errors(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


# --- the product ---------------------------------------------------------------------------------


@pytest.mark.parametrize("promote_every", [128, 32, 1])
def test_matmul_matches_numpy_model_bitwise(promote_every):
    x, w = hard_activations(), hard_weight()
    xq, xs = fb.quantize_activation_tiles(jnp.asarray(x))
    wq, ws = fb.quantize_weight_blocks(jnp.asarray(w))
    start = time.perf_counter()
    y = np.asarray(fb.fp8_blockwise_matmul_reference(xq, xs, wq, ws, promote_every=promote_every))
    elapsed = time.perf_counter() - start
    y_ref = np_matmul(np.asarray(xq), np.asarray(xs), np.asarray(wq), np.asarray(ws), promote_every)
    assert y.dtype == np.float32 and y.shape == (8, 256) and np.isfinite(y).all()
    np.testing.assert_array_equal(y, y_ref)
    # The model is a product: close to the float64 product of the dequantized operands.
    exact = np.asarray(fb.dequantize_activation_tiles(xq, xs), np.float64) @ np.asarray(
        fb.dequantize_weight_blocks(wq, ws), np.float64
    )
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())
    print(f"promote_every={promote_every}: bit-exact, {elapsed * 1e3:.0f} ms (incl. compile)")


def test_matmul_leading_axes_and_out_dtype():
    x = jnp.asarray(hard_activations().reshape(2, 4, 256))
    xq, xs = fb.quantize_activation_tiles(x)
    wq, ws = fb.quantize_weight_blocks(jnp.asarray(hard_weight()))
    y = fb.fp8_blockwise_matmul_reference(xq, xs, wq, ws, out_dtype=jnp.bfloat16)
    flat = fb.fp8_blockwise_matmul_reference(xq.reshape(8, 256), xs.reshape(8, 2), wq, ws)
    assert y.shape == (2, 4, 256) and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y), np.asarray(flat.astype(jnp.bfloat16)).reshape(2, 4, 256))


def test_matmul_rejects_bad_operands():
    xq, xs = fb.quantize_activation_tiles(jnp.ones((8, 256)))
    wq, ws = fb.quantize_weight_blocks(jnp.ones((256, 256)))
    with pytest.raises(ValueError, match="promote_every=48"):
        fb.fp8_blockwise_matmul_reference(xq, xs, wq, ws, promote_every=48)
    with pytest.raises(ValueError, match="same K"):
        fb.fp8_blockwise_matmul_reference(xq[:, :128], xs[:, :1], wq, ws)
    with pytest.raises(ValueError, match="same chunks"):
        fb.fp8_blockwise_matmul_reference(xq, xs, wq, ws[:1].repeat(4, 0))


# --- delayed scaling, and why fine-grained -------------------------------------------------------


def test_delayed_scaling_history():
    h = jnp.zeros(4)
    for amax in [2.0, 8.0, 1.0, 0.5, 0.25]:
        h = fb.update_amax_history(h, jnp.asarray([0.1, -amax]))
    np.testing.assert_array_equal(np.asarray(h), [0.25, 0.5, 1.0, 8.0])  # newest first, 2.0 dropped
    assert float(fb.delayed_scale(h)) == np.float32(8.0) * np.float32(1 / 448)
    assert float(fb.delayed_scale(h, margin=1)) == np.float32(16.0) * np.float32(1 / 448)
    assert float(fb.delayed_scale(jnp.zeros(3))) == np.finfo(F32).tiny


@pytest.mark.parametrize(
    "outlier, min_ratio, max_block",
    [(1e4, 1.05, 0.05), (3e4, 2.0, 0.05), (1e5, 3.0, 0.1), (1e6, 2.5, 0.4)],
)
def test_fine_grained_scaling_beats_per_tensor_with_an_outlier_channel(outlier, min_ratio, max_block):
    """One activation channel ``outlier`` times larger than the rest (a massive activation whose
    weight row is zero, so the exact product is the ordinary channels' and the error shows how
    well they survived). Per-tensor scaling (delayed, from a one-step history: the current amax)
    sizes every value to the outlier; blockwise only the outlier's own tile, 1 of K/128 per row.

    Measured (M=8, K=1024, N=256, error of the whole product, weights quantized blockwise in both):
    e4m3's range (normals from 2^-6 to 448, 2.9e4x) absorbs a 1e4x outlier, so per-tensor is only
    1.1x worse there; past it the ordinary values sink into subnormals and zero: 2.2x at 3e4, 4.3x
    at 1e5, and at 1e6 per-tensor loses every ordinary value (error 1.0) while blockwise loses one
    tile in 8 (0.32)."""
    M, K, N = 8, 1024, 256
    rng = np.random.default_rng(0)
    x = rng.normal(size=(M, K)).astype(F32)
    x[:, 3] = outlier * np.abs(x[:, 3]).clip(0.5)
    w = (rng.normal(size=(K, N)) / np.sqrt(K)).astype(F32)
    w[3] = 0.0
    exact = x.astype(np.float64) @ w.astype(np.float64)
    wq, ws = fb.quantize_weight_blocks(jnp.asarray(w))

    xq, xs = fb.quantize_activation_tiles(jnp.asarray(x))
    y_block = np.asarray(fb.fp8_blockwise_matmul_reference(xq, xs, wq, ws))

    scale = fb.delayed_scale(fb.update_amax_history(jnp.zeros(16), jnp.asarray(x)))
    xq_t = fb.quantize_per_tensor(jnp.asarray(x), scale)
    xs_t = jnp.full((M, K // 128), scale)  # one scale for every tile: per-tensor in the same GEMM
    y_tensor = np.asarray(fb.fp8_blockwise_matmul_reference(xq_t, xs_t, wq, ws))

    def rel(y):
        return float(np.linalg.norm(y - exact) / np.linalg.norm(exact))

    err_block, err_tensor = rel(y_block), rel(y_tensor)
    print(
        f"outlier {outlier:.0e}x: relative error per-tensor {err_tensor:.4f}, "
        f"blockwise {err_block:.4f}, ratio {err_tensor / err_block:.1f}"
    )
    assert err_block < max_block and err_tensor > min_ratio * err_block


def test_ops_dispatches_to_the_reference_and_the_kernel():
    from llmarch import ops

    x = jnp.asarray(hard_activations().reshape(2, 4, 256))
    xq, xs = fb.quantize_activation_tiles(x)
    wq, ws = fb.quantize_weight_blocks(jnp.asarray(hard_weight()))
    expected = np.asarray(fb.fp8_blockwise_matmul_reference(xq, xs, wq, ws, promote_every=32))
    np.testing.assert_array_equal(
        np.asarray(ops.fp8_blockwise_matmul(xq, xs, wq, ws, promote_every=32)), expected
    )
    assert ops.available("fp8_blockwise_matmul") == (ops.Impl.XLA, ops.Impl.PALLAS)
    y = np.asarray(ops.fp8_blockwise_matmul(xq, xs, wq, ws, impl="pallas"))  # interpreted on CPU
    assert y.shape == (2, 4, 256)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    with pytest.raises(ValueError, match="promote_every=32 is invalid for the Pallas kernel"):
        ops.fp8_blockwise_matmul(xq, xs, wq, ws, promote_every=32, impl="pallas")
