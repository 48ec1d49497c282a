"""RTN against a numpy reference bit for bit, packing round trips, FP8, QuantizedTensor, QuantConfig."""

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from llmarch.quant import tensor as qtensor
from llmarch.quant.config import QuantConfig
from llmarch.quant.tensor import QuantizedTensor, dequantize, fp8, pack, rtn, unpack


def rtn_reference(w, bits, group_size, symmetric):
    """One group of one column at a time, written from the formulas of quant_design.md."""
    K, N = w.shape
    g = K if group_size is None else group_size
    q = np.zeros((K, N), np.int64)
    scale = np.zeros((K // g, N), np.float32)
    zero = np.zeros((K // g, N), np.int64)
    for j, n in itertools.product(range(K // g), range(N)):
        col = w[j * g : (j + 1) * g, n].astype(np.float32)
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            amax = np.float32(np.abs(col).max())
            s = np.float32(1) if amax == 0 else np.float32(amax / np.float32(qmax))
            q[j * g : (j + 1) * g, n] = np.clip(np.round(col / s), -qmax - 1, qmax)
        else:
            levels = 2**bits - 1
            lo, hi = np.float32(col.min()), np.float32(col.max())
            s = np.float32(1) if hi == lo else np.float32((hi - lo) / np.float32(levels))
            z = np.clip(np.round(-lo / s), 0, levels)
            zero[j, n] = z
            q[j * g : (j + 1) * g, n] = np.clip(np.round(col / s) + z, 0, levels)
        scale[j, n] = s
    return q, scale, (None if symmetric else zero)


def _weight(shape, seed=0):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w[:, 0] = 0.0  # an all-zero column: scale 1, not a division by zero
    w[:4, 1] = 0.5  # a constant group
    return w


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_matches_numpy_reference_bit_for_bit(bits, group_size, symmetric):
    w = _weight((64, 6))
    ref_q, ref_s, ref_z = rtn_reference(w, bits, group_size, symmetric)
    q, s, z = rtn(w, bits, group_size, symmetric)
    assert q.dtype == (np.uint8 if bits == 8 and not symmetric else np.int8)
    np.testing.assert_array_equal(q.astype(np.int64), ref_q)
    assert s.dtype == np.float32
    np.testing.assert_array_equal(s, ref_s)
    if symmetric:
        assert z is None
    else:
        np.testing.assert_array_equal(np.asarray(z).astype(np.int64), ref_z)


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_in_jax_agrees_to_one_ulp(symmetric):
    # XLA:CPU divides to within 1 ulp, not correctly rounded as numpy does: scales may differ by
    # an ulp, and a value exactly on a rounding boundary may land one level over.
    w = _weight((64, 6))
    q, s, z = rtn(w, 4, 32, symmetric)
    jq, js, jz = jax.jit(rtn, static_argnums=(1, 2, 3))(jnp.asarray(w), 4, 32, symmetric)
    np.testing.assert_array_max_ulp(np.asarray(js), s, maxulp=1)
    assert np.abs(np.asarray(jq).astype(int) - q.astype(int)).max() <= 1
    assert np.mean(np.asarray(jq) == q) > 0.99


def test_rtn_batched_matches_per_expert():
    w = np.random.default_rng(1).standard_normal((3, 32, 5)).astype(np.float32)
    q, s, z = rtn(w, 4, 32, False)
    for e in range(3):
        qe, se, ze = rtn(w[e], 4, 32, False)
        np.testing.assert_array_equal(q[e], qe)
        np.testing.assert_array_equal(s[e], se)
        np.testing.assert_array_equal(z[e], ze)


@pytest.mark.parametrize("bits,signed", [(4, True), (4, False), (3, True), (3, False), (8, True)])
def test_pack_unpack_round_trip(bits, signed):
    rng = np.random.default_rng(2)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    q = rng.integers(lo, hi + 1, size=(2, 16, 5)).astype(np.int8)
    p = pack(q, bits, signed=signed)
    if bits < 8:
        assert p.dtype == np.uint8 and p.shape == (2, 8, 5)
        # row 2i in the low nibble, 2i+1 in the high one, signed values offset by 8
        off = 8 if signed else 0
        np.testing.assert_array_equal(p[0, 0, 0] & 0xF, q[0, 0, 0] + off)
        np.testing.assert_array_equal(p[0, 0, 0] >> 4, q[0, 1, 0] + off)
    np.testing.assert_array_equal(unpack(p, bits, 16, signed=signed), q)
    np.testing.assert_array_equal(np.asarray(unpack(jnp.asarray(p), bits, 16, signed=signed)), q)


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 32])
def test_quantized_tensor_dequantizes_to_the_formula(bits, symmetric, group_size):
    w = _weight((64, 6), seed=3)
    q, s, z = rtn(w, bits, group_size, symmetric)
    qt = QuantizedTensor.from_unpacked(q, s, z, bits, group_size)
    assert qt.shape == (64, 6) and qt.bits == bits and qt.kind == "int"
    assert qt.q.shape == ((64, 6) if bits == 8 else (32, 6))
    g = 64 if group_size is None else group_size
    zf = 0 if z is None else np.repeat(z.astype(np.float32), g, axis=0)
    want = (q.astype(np.float32) - zf) * np.repeat(s, g, axis=0)
    got = np.asarray(jax.jit(dequantize)(qt))
    np.testing.assert_array_equal(got, want)
    # the error of round to nearest is at most half a step
    assert np.all(np.abs(got - w) <= np.repeat(s, g, axis=0) * 0.5 + 1e-6)
    packed_bytes = 64 * 6 if bits == 8 else 32 * 6
    assert qt.nbytes == packed_bytes + s.nbytes + (0 if z is None else z.nbytes)


def test_quantized_tensor_is_a_pytree_with_static_metadata():
    qt = qtensor.quantize(_weight((32, 4)), method="rtn", bits=4, group_size=32, symmetric=False)
    leaves, tree = jax.tree.flatten(qt)
    assert len(leaves) == 3
    again = jax.tree.unflatten(tree, leaves)
    assert again.bits == 4 and again.shape == (32, 4) and again.group_size == 32


@pytest.mark.parametrize("block", [None, 16])
def test_fp8_per_column_and_blocks(block):
    w = _weight((40, 20), seed=4) * 3
    q, s = fp8(w, block)
    assert q.dtype == jnp.float8_e4m3fn
    if block is None:
        assert s.shape == (1, 20)
        amax = np.abs(w).max(0)
        np.testing.assert_allclose(np.asarray(s)[0], np.where(amax == 0, 1, amax / 448), rtol=1e-6)
    else:
        assert s.shape == (3, 2)  # ceil(40/16), ceil(20/16): partial edge blocks
        np.testing.assert_allclose(np.asarray(s)[2, 1], np.abs(w[32:, 16:]).max() / 448, rtol=1e-6)
    qt = QuantizedTensor.from_unpacked(q, s, None, 8, block, kind="fp8")
    got = np.asarray(dequantize(qt))
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 for normal numbers
    full = np.repeat(np.repeat(np.asarray(s), block or 40, 0), block or 1, 1)[:40, :20]
    want = np.asarray(q).astype(np.float32) * full
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, w, rtol=2**-4, atol=float(np.asarray(s).max()) * 2**-6)
    # the scaled values use the full e4m3 range and never overflow it
    assert float(np.abs(np.asarray(q).astype(np.float32)).max()) == 448.0
    assert np.dtype(ml_dtypes.float8_e4m3fn).itemsize == 1


def test_groups_must_divide_k_and_k_even_for_nibbles():
    with pytest.raises(ValueError, match="group_size=32 does not divide the input dimension K=48"):
        rtn(np.zeros((48, 4), np.float32), 4, 32, True)
    with pytest.raises(ValueError, match="K=7 .* must be even"):
        rtn(np.zeros((7, 4), np.float32), 4, None, True)


def test_quant_config_json_round_trip_and_errors():
    cfg = QuantConfig(method="gptq", bits=4, group_size=128, symmetric=False, gptq_act_order=True)
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    for kwargs, match in [
        ({"method": "hqq"}, "QuantConfig.method='hqq' is invalid"),
        ({"bits": 2}, "QuantConfig.bits=2 is invalid"),
        ({"group_size": 48}, "QuantConfig.group_size=48 is invalid"),
        ({"fp8_block": 128}, "applies to method='fp8' only"),
        ({"gptq_damp": -1.0}, "gptq_damp"),
        ({"awq_grid": 1}, "awq_grid"),
    ]:
        with pytest.raises(ValueError, match=match):
            QuantConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown fields"):
        QuantConfig.from_json('{"method": "rtn", "bitz": 4}')
