"""The quantized matmul (Pallas builds in interpret mode) against ``quantized_matmul_reference``,
the reference against a numpy dequantization, bad inputs, and lowering for TPU and CUDA.

Weights are random integers in each format's range (not RTN of a float matrix: the kernel must
be right for any stored value), packed here by an independent numpy packer. Both kernel builds
run in the interpreter with small tiles, so M, K and N span several tiles, none a multiple of
its tile (padding runs), and K tiles hold several groups, split one group, or share the one
per-channel scale row. Tolerances, relative to the largest magnitude of the expected array:
float32 2e-5 (the kernel and the reference differ only in summation order); bfloat16 1e-2 (the
same bf16 weights and activations, float32 accumulation in different orders).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kernels_pallas import quantized_matmul as qm

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2}


def assert_close(actual, expected, dtype, what=""):
    expected = np.asarray(expected, np.float32)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), expected, rtol=0, atol=TOL[dtype] * scale, err_msg=what
    )


def make_weight(K, N, bits, symmetric, group_size, seed=0):
    """Random stored weight ``(q, scale, zero)`` and its numpy dequantization ``W [K,N]``."""
    rng = np.random.default_rng(seed)
    groups = 1 if group_size is None else K // group_size
    g = K // groups
    if symmetric:
        v = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (K, N))
        zero = None
        stored = v + 8  # nibbles hold q + 8
    else:
        v = rng.integers(0, 2**bits, (K, N))
        zero = rng.integers(0, 2**bits, (groups, N)).astype(np.uint8 if bits == 8 else np.int8)
        stored = v
    if bits == 8:
        q = v.astype(np.int8 if symmetric else np.uint8)
    else:
        q = (stored[0::2] | (stored[1::2] << 4)).astype(np.uint8)  # row 2i low nibble, 2i+1 high
    scale = rng.uniform(0.5, 2.0, (groups, N)).astype(np.float32) / 2 ** (bits - 1)
    z = 0 if zero is None else np.repeat(zero.astype(np.float32), g, axis=0)
    w = (v.astype(np.float32) - z) * np.repeat(scale, g, axis=0)
    return jnp.asarray(q), jnp.asarray(scale), (None if zero is None else jnp.asarray(zero)), w


def activations(M, K, dtype, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(M, K)), dtype)


@pytest.mark.parametrize("bits", qm.BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_reference_dequantizes_like_numpy(bits, symmetric, group_size):
    q, scale, zero, w = make_weight(64, 24, bits, symmetric, group_size)
    got = qm.dequantize_reference(q, scale, zero, bits=bits, group_size=group_size)
    np.testing.assert_array_equal(np.asarray(got), w)
    x = activations(3, 64, jnp.float32)
    assert_close(
        qm.quantized_matmul_reference(x, q, scale, zero, bits=bits, group_size=group_size),
        np.asarray(x) @ w,
        jnp.float32,
    )


# (M, K, N, group_size, BlockSizes): two groups per K tile (K=96: the last tile has one real
# group and one of padding); a group split over two K tiles; per channel over three K tiles
# (K=96 padded to 128: a partial last tile).
TILINGS = {
    "groups_in_tile": (13, 96, 40, 32, qm.BlockSizes(block_m=8, block_k=64, block_n=16)),
    "tiles_in_group": (13, 128, 40, 64, qm.BlockSizes(block_m=8, block_k=32, block_n=16)),
    "per_channel": (5, 96, 24, None, qm.BlockSizes(block_m=8, block_k=32, block_n=16)),
}


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("tiling", sorted(TILINGS))
def test_kernel_builds_match_reference(target, bits, symmetric, tiling):
    M, K, N, g, bs = TILINGS[tiling]
    q, scale, zero, _ = make_weight(K, N, bits, symmetric, g)
    x = activations(M, K, jnp.float32)
    st = qm._Static(bits, g, bs, True)
    out = jax.jit(lambda x, q, s, z: qm._call(st, target, True, x, q, s, z))(x, q, scale, zero)
    want = qm.quantized_matmul_reference(x, q, scale, zero, bits=bits, group_size=g)
    assert out.shape == (M, N) and out.dtype == jnp.float32
    assert_close(out, want, jnp.float32, f"{target} bits={bits} symmetric={symmetric} {tiling}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "bits,symmetric,group_size", [(8, False, 32), (4, True, None), (3, False, 64), (3, True, 32)]
)
def test_public_wrapper(dtype, bits, symmetric, group_size):
    """Leading batch axes, both activation dtypes, int3 in nibbles, default tiles and small ones."""
    K, N = 128, 48
    q, scale, zero, w = make_weight(K, N, bits, symmetric, group_size, seed=bits)
    x = activations(6, K, dtype).reshape(2, 3, K)
    want = qm.quantized_matmul_reference(x, q, scale, zero, bits=bits, group_size=group_size)
    for bs in (None, qm.BlockSizes(block_m=4, block_k=64, block_n=16)):
        got = qm.quantized_matmul(
            x, q, scale, zero, bits=bits, group_size=group_size, block_sizes=bs, interpret=True
        )
        assert got.shape == (2, 3, N) and got.dtype == dtype
        assert_close(got, want, dtype, f"block_sizes={bs}")
    # The bf16 reference rounds W to bf16 first; both stay close to the exact float32 product.
    assert_close(got, np.asarray(x, np.float32) @ w, jnp.bfloat16)
    empty = qm.quantized_matmul(x[:0], q, scale, zero, bits=bits, group_size=group_size, interpret=True)
    assert empty.shape == (0, 3, N) and empty.dtype == dtype


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, q, s: qm.quantized_matmul(x, q, s, bits=5, group_size=32), r"bits=5 is invalid"),
        (lambda x, q, s: qm.quantized_matmul(x[:, :10], q, s, bits=4, group_size=32), r"x has K=10 columns"),
        (
            lambda x, q, s: qm.quantized_matmul(x, q.astype(jnp.int32), s, bits=8, group_size=32),
            r"int8 or uint8",
        ),
        (lambda x, q, s: qm.quantized_matmul(x, q, s, bits=4, group_size=48), r"group_size=48 is invalid"),
        (lambda x, q, s: qm.quantized_matmul(x, q, s, bits=4, group_size=64), r"scale has shape \(2, 8\)"),
        (lambda x, q, s: qm.quantized_matmul(x, q, s, s, bits=4, group_size=32), r"zero has dtype float32"),
        (lambda x, q, s: qm.quantized_matmul(x, q.astype(jnp.int8), s, bits=4, group_size=32), r"uint8"),
        (
            lambda x, q, s: qm.quantized_matmul(x.astype(jnp.int32), q, s, bits=4, group_size=32),
            r"x has dtype",
        ),
        (
            lambda x, q, s: qm.quantized_matmul(x, q, s, bits=4, group_size=32, block_sizes=(8, 8)),
            "BlockSizes",
        ),
        (lambda x, q, s: qm.BlockSizes(block_k=0), r"BlockSizes.block_k=0 is invalid"),
    ],
)
def test_bad_inputs_are_clear_errors(call, match):
    q, scale, _, _ = make_weight(64, 8, 4, True, 32)
    with pytest.raises((ValueError, TypeError), match=match):
        call(activations(3, 64, jnp.float32), q, scale)


@pytest.mark.parametrize(
    "target,bits,block_k,group_size,match",
    [
        ("tpu", 4, 128, 128, r"block_k=128 does not tile on TPU: must be a multiple of 256"),
        ("tpu", 8, 192, 64, r"block_k=192 does not tile on TPU: must be a multiple of 128"),
        ("gpu", 8, 96, 32, r"block_k=96 does not tile on GPU \(Triton\): must be a power of two >= 16"),
        ("gpu", 4, 16, 32, r"block_k=16 does not tile on GPU \(Triton\): must be a power of two >= 32"),
        ("tpu", 8, 256, 384, r"block_k=256 does not align with group_size=384"),
        ("tpu", 4, 256, 8, r"group_size=8 gives 4-row groups of packed weights"),
    ],
)
def test_tiles_a_target_rejects_fail_when_traced(target, bits, block_k, group_size, match):
    K, N = 4608, 512
    q = jax.ShapeDtypeStruct((K if bits == 8 else K // 2, N), jnp.int8 if bits == 8 else jnp.uint8)
    s = jax.ShapeDtypeStruct((K // group_size, N), jnp.float32)
    st = qm._Static(bits, group_size, qm.BlockSizes(block_m=16, block_k=block_k, block_n=128), False)
    x = jax.ShapeDtypeStruct((16, K), jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda x, q, s: qm._call(st, target, False, x, q, s, None), x, q, s)


# Lowering, as tests/test_kernels_lowering.py does for the other kernels: realistic shapes and
# bfloat16 activations, decoding (M=8) and prefill (M=512), default tiles, one kernel per call.
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
LOWERING = {
    "w8_per_channel_decode": (8, 4096, 4096, 8, True, None),
    "w4g128_asymmetric_decode": (8, 4096, 11008, 4, False, 128),
    "w4g32_prefill": (512, 2048, 1536, 4, True, 32),
    "w3g128_asymmetric": (16, 1024, 1024, 3, False, 128),
}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", sorted(LOWERING))
def test_kernel_lowers(case, platform):
    backend = jax.default_backend()
    if backend in ("gpu", "tpu") and {"gpu": "cuda"}.get(backend, backend) != platform:
        pytest.skip(f"exporting for {platform} from a {backend} backend")
    M, K, N, bits, symmetric, g = LOWERING[case]
    groups = 1 if g is None else K // g
    q_dtype = jnp.uint8 if bits < 8 or not symmetric else jnp.int8
    args = [
        jax.ShapeDtypeStruct((M, K), jnp.bfloat16),
        jax.ShapeDtypeStruct((K if bits == 8 else K // 2, N), q_dtype),
        jax.ShapeDtypeStruct((groups, N), jnp.float32),
    ]
    if not symmetric:
        args.append(jax.ShapeDtypeStruct((groups, N), jnp.uint8 if bits == 8 else jnp.int8))

    def f(x, q, s, *zero):
        return qm.quantized_matmul(x, q, s, *zero, bits=bits, group_size=g)

    kw = {}
    if platform == "cuda":
        kw["disabled_checks"] = [export.DisabledSafetyCheck.custom_call(CUSTOM_CALL["cuda"])]
    module = export.export(jax.jit(f), platforms=[platform], **kw)(*args).mlir_module()
    assert module.count(CUSTOM_CALL[platform]) == 1
    # The kernel reads the stored bytes as they are (default tiles divide K and N: no padded
    # copy), and no dequantized [K,N] weight exists outside it.
    stored = f"tensor<{args[1].shape[0]}x{N}x{'i8' if q_dtype == jnp.int8 else 'ui8'}>"
    assert module.count(stored) >= 2, f"{stored} does not reach the kernel unchanged"
    for float_type in ("bf16", "f32"):
        assert f"tensor<{K}x{N}x{float_type}>" not in module
