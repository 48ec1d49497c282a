"""Flash attention (Pallas, interpret mode) against ``attention_reference``: values and gradients.

Tolerances, relative to the largest magnitude of the expected array: float32 inputs 2e-5
(values and gradients); bfloat16 inputs 1.5e-2, against the float32 reference on the same
bf16-rounded inputs (the bf16 reference itself is off by about as much: P·V in bf16).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import _common as common
from kernels_pallas import _tile_ranges
from kernels_pallas.flash_attention import BlockSizes, attention_reference, flash_attention

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2}
SMALL = BlockSizes(block_q=8, block_kv=8, block_q_bwd=8, block_kv_bwd=8)


def assert_close(actual, expected, dtype, what=""):
    expected = np.asarray(expected, np.float32)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), expected, rtol=0, atol=TOL[dtype] * scale, err_msg=what
    )


def _inputs(B, T, S, N, K, H, dtype, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H)).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, H)).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, H)).astype(dtype)
    return q, k, v, jax.random.normal(kd, (B, T, N, H))


def _options(name, B, T, S):
    """Mask options: positions (queries at the end of the keys, as in decoding against a
    cache, when T < S), and segment ids that pack two documents in row 0."""
    kv_pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    q_pos = kv_pos[:, S - T :]
    opts = dict(q_positions=q_pos, kv_positions=kv_pos)
    if name == "window":
        opts["sliding_window"] = 3
    elif name == "segments":
        seg = jnp.zeros((B, S), jnp.int32).at[0, S // 2 :].set(1)
        opts.update(q_segment_ids=seg[:, S - T :], kv_segment_ids=seg)
    elif name == "noncausal":
        opts["causal"] = False
    return opts


def _check(shape, dtype, option, block_sizes=SMALL):
    B, T, S, N, K, H = shape
    q, k, v, d_out = _inputs(B, T, S, N, K, H, dtype)
    opts = _options(option, B, T, S)
    kernel = functools.partial(flash_attention, block_sizes=block_sizes, interpret=True, **opts)
    reference = functools.partial(attention_reference, **opts)

    def value_and_grads(fn, *args):
        out, vjp = jax.vjp(fn, *args)
        return (out, *vjp(d_out.astype(out.dtype)))

    got = jax.jit(functools.partial(value_and_grads, kernel))(q, k, v)
    want = value_and_grads(reference, *(x.astype(jnp.float32) for x in (q, k, v)))
    assert got[0].dtype == dtype
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close(a, b, dtype, f"{name} {shape} {dtype.__name__} {option}")


GQA_RAGGED = (1, 13, 13, 4, 2, 16)  # T, S not multiples of the 8-blocks; G = 2


@pytest.mark.parametrize("option", ["causal", "window", "segments", "noncausal"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flash_attention_matches_reference(dtype, option):
    _check(GQA_RAGGED, dtype, option)


@pytest.mark.parametrize(
    "shape,option",
    [
        ((2, 5, 19, 3, 1, 8), "window"),  # MQA, 5 queries at the end of 19 keys (a cache)
        ((2, 16, 16, 2, 2, 8), "segments"),  # MHA, exact multiples of the blocks
    ],
)
def test_flash_attention_other_shapes(shape, option):
    _check(shape, jnp.float32, option)


@pytest.mark.parametrize("option", ["causal", "window", "segments", "noncausal"])
def test_gpu_build_matches_reference(monkeypatch, option):
    """The GPU (Triton) build, interpreted: its loops run over the tile ranges of
    ``_tile_ranges`` instead of skipping tiles with a branch; queries at the end of longer keys."""
    monkeypatch.setattr(common, "INTERPRET_TARGET", "gpu")
    _check((2, 13, 21, 4, 2, 16), jnp.float32, option)


def test_gpu_build_query_that_sees_nothing(monkeypatch):
    monkeypatch.setattr(common, "INTERPRET_TARGET", "gpu")
    test_query_that_sees_nothing_gets_zeros_and_finite_grads()


@pytest.mark.parametrize("trial", range(6))
def test_tile_ranges_cover_every_visible_tile(trial):
    """Against the elementwise mask, brute force: every (query tile, key tile) pair with a visible
    pair inside lies in the query tile's key range and in the key tile's query range, for
    shuffled positions and segments too. Causal masking of sorted positions alone (training
    without packing) is ruled out exactly: no invisible tile is computed."""
    rng = np.random.default_rng(trial)
    B, T, S, bq, bk = 2, 16, 24, 4, 8
    monotone = trial % 2 == 0
    q_pos = np.sort(rng.integers(0, 30, (B, T))) if monotone else rng.integers(0, 30, (B, T))
    kv_pos = np.sort(rng.integers(0, 30, (B, S))) if monotone else rng.integers(0, 30, (B, S))
    q_seg, kv_seg = np.sort(rng.integers(0, 3, (B, T))), np.sort(rng.integers(0, 3, (B, S)))
    causal, window = trial % 3 != 2, [None, 5, 9][trial % 3]
    mask = np.ones((B, T, S), bool) & (q_seg[:, :, None] == kv_seg[:, None, :])
    if causal:
        mask &= kv_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask &= q_pos[:, :, None] - kv_pos[:, None, :] < window
    exact = mask.reshape(B, T // bq, bq, S // bk, bk).any(axis=(2, 4))  # [B, Tb, Sb]
    vis = _tile_ranges.visible(
        *map(jnp.asarray, (q_pos, kv_pos, q_seg, kv_seg)),
        block_q=bq,
        block_kv=bk,
        causal=causal,
        window=window,
    )
    assert np.all(np.asarray(vis) | ~exact)  # conservative: never rules out a visible tile
    for axis in (2, 1):
        lo, hi = map(np.asarray, _tile_ranges.ranges(vis, exact.shape, axis=axis))
        idx = np.arange(exact.shape[axis])
        idx = idx[None, None, :] if axis == 2 else idx[None, :, None]
        lo, hi = np.expand_dims(lo, axis), np.expand_dims(hi, axis)
        assert np.all(~exact | ((lo <= idx) & (idx < hi)))
    if monotone:
        plain = kv_pos[:, None, :] <= q_pos[:, :, None]
        only_causal = _tile_ranges.visible(
            jnp.asarray(q_pos),
            jnp.asarray(kv_pos),
            None,
            None,
            block_q=bq,
            block_kv=bk,
            causal=True,
            window=None,
        )
        exact = plain.reshape(B, T // bq, bq, S // bk, bk).any(axis=(2, 4))
        np.testing.assert_array_equal(np.asarray(only_causal), exact)


def test_without_interpret_a_cpu_runs_the_interpreted_kernel():
    """interpret=False stages out the TPU and Triton builds; the CPU takes the default branch,
    the interpreted kernel (never a silent fallback to the reference)."""
    q, k, v, _ = _inputs(1, 8, 8, 2, 1, 8, jnp.float32)
    pos = jnp.arange(8)[None]
    f = jax.jit(functools.partial(flash_attention, q_positions=pos, kv_positions=pos))
    assert "pallas_call" in str(jax.make_jaxpr(f)(q, k, v))
    assert_close(f(q, k, v), attention_reference(q, k, v, q_positions=pos, kv_positions=pos), jnp.float32)


def test_query_that_sees_nothing_gets_zeros_and_finite_grads():
    q, k, v, _ = _inputs(1, 4, 4, 2, 2, 8, jnp.float32)
    pos = jnp.arange(4)[None]
    seg_q, seg_k = jnp.array([[1, 1, 2, 2]]), jnp.array([[2, 2, 2, 2]])  # queries 0, 1 see no key

    def f(q, k, v):
        return flash_attention(
            q,
            k,
            v,
            q_positions=pos,
            kv_positions=pos,
            q_segment_ids=seg_q,
            kv_segment_ids=seg_k,
            block_sizes=SMALL,
            interpret=True,
        )

    out = jax.jit(f)(q, k, v)
    assert np.all(np.asarray(out[:, :2]) == 0)
    grads = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(grads[0][:, :2], 0)


def _qkv_shapes(N=4, K=2, H=8):
    return (jnp.zeros((1, 4, N, H)), jnp.zeros((1, 4, K, H)), jnp.zeros((1, 4, K, H)))


def test_bad_inputs_raise_before_compiling():
    pos = jnp.zeros((1, 4), jnp.int32)
    q, k, v = _qkv_shapes(N=3, K=2)
    with pytest.raises(ValueError, match="3 heads, not a multiple of k's 2 KV heads"):
        flash_attention(q, k, v, q_positions=pos, kv_positions=pos, interpret=True)
    q, k, v = _qkv_shapes()
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(q, k[..., :4], v[..., :4], q_positions=pos, kv_positions=pos)
    with pytest.raises(ValueError, match="q_positions has shape"):
        flash_attention(q, k, v, q_positions=pos[:, :3], kv_positions=pos)
    with pytest.raises(ValueError, match="given together"):
        flash_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=pos)
    with pytest.raises(ValueError, match="sliding_window=0"):
        flash_attention(q, k, v, q_positions=pos, kv_positions=pos, sliding_window=0)
    with pytest.raises(ValueError, match="BlockSizes.block_q=0"):
        BlockSizes(block_q=0)


@pytest.mark.parametrize(
    "blocks,match",
    [
        (BlockSizes(block_q=128, block_kv=96), "block_kv=96 does not tile on TPU"),
        (BlockSizes(block_q=24, block_kv=128), "block_q=24 does not tile on GPU"),
    ],
)
def test_block_sizes_that_do_not_tile_raise_at_trace_time(blocks, match):
    """Without interpret, tracing builds the TPU and the Triton kernels: each checks its tiles."""
    q = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((1, 1024), jnp.int32)

    def f(q, pos):
        return flash_attention(q, q, q, q_positions=pos, kv_positions=pos, block_sizes=blocks)

    with pytest.raises(ValueError, match=match):
        jax.eval_shape(f, q, pos)
