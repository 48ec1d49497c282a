"""The blockwise-scaled FP8 GEMM (both Pallas builds, in interpret mode) against its reference and
against ``llmarch.quant.fp8_blockwise``'s bit-exact model, plus bad operands.

Operands come from the library's quantizers on inputs with an outlier channel, so the scales vary
by tile and block. M is not a multiple of the row tile (padding runs) and K spans several chunks.
Tolerance, relative to the largest magnitude of the expected output: 1e-6 in float32 (the same
exact products, summed within a chunk in the MMA's order instead of the model's tree), 1e-2 when
the output is bfloat16.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import fp8_blockwise_matmul as fk
from llmarch.quant import fp8_blockwise as fb

TOL = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2}


def operands(M, K, N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(M, K)).astype(np.float32)
    x[:, 5] *= 1e3  # an outlier channel: its tiles get large scales
    blocks = rng.normal(size=(K // 128, 128, N // 128, 128))
    w = (blocks * np.exp(rng.uniform(-3, 3, size=(K // 128, 1, N // 128, 1)))).reshape(K, N)  # scales vary
    xq, xs = fb.quantize_activation_tiles(jnp.asarray(x))
    wq, ws = fb.quantize_weight_blocks(jnp.asarray(w, jnp.float32))
    return xq, xs, wq, ws


def assert_close(actual, expected, dtype):
    expected = np.asarray(expected, np.float32)
    atol = TOL[dtype] * float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize("M, K, N, block_m", [(20, 384, 256, 16), (8, 256, 128, 64)])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_the_model(target, M, K, N, block_m, out_dtype):
    xq, xs, wq, ws = operands(M, K, N)
    y = fk.fp8_blockwise_matmul(
        xq, xs, wq, ws, out_dtype=out_dtype, block_sizes=fk.BlockSizes(block_m), interpret=True, target=target
    )
    model = fb.fp8_blockwise_matmul_reference(xq, xs, wq, ws)
    assert y.shape == (M, N) and y.dtype == out_dtype
    assert_close(y, model, out_dtype)
    assert_close(fk.fp8_blockwise_matmul_reference(xq, xs, wq, ws), model, jnp.float32)


def test_kernel_rejects_bad_operands():
    xq, xs, wq, ws = operands(8, 256, 128)
    with pytest.raises(ValueError, match="same K"):
        fk.fp8_blockwise_matmul(xq[:, :128], xs[:, :1], wq, ws, interpret=True)
    with pytest.raises(ValueError, match=r"xs \(8, 1\)"):
        fk.fp8_blockwise_matmul(xq, xs[:, :1], wq, ws, interpret=True)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fk.fp8_blockwise_matmul(xq.astype(jnp.bfloat16), xs, wq, ws, interpret=True)
    with pytest.raises(ValueError, match="multiples of 128"):
        fk.fp8_blockwise_matmul(xq, xs, wq[:, :96], ws, interpret=True)
