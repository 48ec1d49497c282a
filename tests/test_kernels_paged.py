"""Paged attention and MLA latent decoding (Pallas, interpret mode; and the blocked XLA path
that llmarch.ops runs on CPU) against their references.

The batch mixes decode steps (one query token, the rest of the row padded with position -1)
with chunked-prefill chunks (several tokens at given positions); lengths cut pages partway;
table entries past a sequence's pages hold garbage. Both kernel builds run in the
interpreter (TPU: scalar-prefetched page BlockSpecs; GPU/Triton: page-id loads), with one
and several splits. Tolerances, relative to the largest magnitude of the expected array:
float32 2e-5; bfloat16 1.5e-2 against the float32 reference on the same bf16 inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import _paged
from kernels_pallas import mla_decode as md
from kernels_pallas import paged_attention as pa

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2}


def assert_close(actual, expected, dtype, what=""):
    expected = np.asarray(expected, np.float32)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), expected, rtol=0, atol=TOL[dtype] * scale, err_msg=what
    )


def _batch(page_size, num_pages=16, max_pages=5, seed=0):
    """Tables, lengths and query positions of a mixed batch of 3 sequences, T=3 query slots:
    row 0 decodes at position 16, row 1 prefills a chunk at positions 2..4, row 2 decodes at
    position 8 (its pages start mid-cache)."""
    perm = jax.random.permutation(jax.random.key(seed), num_pages)[: 3 * max_pages]
    tables = perm.reshape(3, max_pages).astype(jnp.int32)
    lengths = jnp.array([17, 5, 9], jnp.int32)
    used = -(-lengths // page_size)
    garbage = jnp.arange(max_pages)[None] >= used[:, None]
    tables = jnp.where(garbage, 999, tables)  # never read
    q_positions = jnp.array([[16, -1, -1], [2, 3, 4], [8, -1, -1]], jnp.int32)
    return tables, lengths, q_positions


def _gqa(dtype, N=4, K=2, H=16, page_size=4, num_pages=16):
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(k1, (3, 3, N, H)).astype(dtype)
    k_pages = jax.random.normal(k2, (num_pages, page_size, K, H)).astype(dtype)
    v_pages = jax.random.normal(k3, (num_pages, page_size, K, H)).astype(dtype)
    return q, k_pages, v_pages


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize("window,splits", [(None, 1), (3, 3)])
def test_paged_attention_builds_match_reference(target, window, splits):
    q, k_pages, v_pages = _gqa(jnp.float32)
    tables, lengths, q_pos = _batch(page_size=4)
    K, H = k_pages.shape[2:]
    spec = _paged.Spec(
        caches=(_paged.Cache(H, True), _paged.Cache(H, True)),
        score_caches=(0,),
        value_cache=1,
        value_width=H,
        page_size=4,
        scale=H**-0.5,
        window=window,
        block_sizes=_paged.BlockSizes(pages_per_block=2, num_splits=splits),
        interpret=True,
        name="paged_attention",
    )
    caches = [x.reshape(x.shape[0], 4, K * H) for x in (k_pages, v_pages)]
    out = jax.jit(lambda q, c, t, l, p: _paged.attend(spec, target, True, [q], c, t, l, p, K))(
        q, caches, tables, lengths, q_pos
    )
    want = pa.paged_attention_reference(q, k_pages, v_pages, tables, lengths, q_pos, sliding_window=window)
    assert_close(out, want, jnp.float32)
    np.testing.assert_array_equal(out[0, 1:], 0)  # padding query slots


@pytest.mark.parametrize(
    "dtype,N,K,page_size",
    [
        (jnp.float32, 4, 4, 8),  # MHA, bigger pages
        (jnp.bfloat16, 6, 2, 4),  # GQA with G = 3
    ],
)
def test_paged_attention_public_wrapper(dtype, N, K, page_size):
    q, k_pages, v_pages = _gqa(dtype, N=N, K=K, page_size=page_size)
    tables, lengths, q_pos = _batch(page_size=page_size)
    out = pa.paged_attention(
        q,
        k_pages,
        v_pages,
        tables,
        lengths,
        q_pos,
        block_sizes=pa.BlockSizes(pages_per_block=2, num_splits=2),
        interpret=True,
    )
    assert out.dtype == dtype
    want = pa.paged_attention_reference(
        *(x.astype(jnp.float32) for x in (q, k_pages, v_pages)), tables, lengths, q_pos
    )
    assert_close(out, want, dtype)


def test_paged_reference_equals_contiguous_attention():
    """The spec itself: a sequence's pages, read in table order, are its contiguous cache."""
    q, k_pages, v_pages = _gqa(jnp.float32)
    tables, lengths, q_pos = _batch(page_size=4)
    got = pa.paged_attention_reference(q, k_pages, v_pages, tables, lengths, q_pos)
    b = 1  # the prefill chunk: queries 2, 3, 4 over keys 0..4
    k = pa.gather_pages(k_pages, tables)[b : b + 1, :5]
    v = pa.gather_pages(v_pages, tables)[b : b + 1, :5]
    from kernels_pallas.flash_attention import attention_reference

    want = attention_reference(
        q[b : b + 1], k, v, q_positions=q_pos[b : b + 1], kv_positions=jnp.arange(5)[None]
    )
    np.testing.assert_allclose(got[b : b + 1], want, atol=1e-6)


def _mla(dtype, N=4, A=32, R=8, page_size=4, num_pages=16):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(2), 4)
    return (
        jax.random.normal(k1, (3, 3, N, A)).astype(dtype),
        jax.random.normal(k2, (3, 3, N, R)).astype(dtype),
        jax.random.normal(k3, (num_pages, page_size, A)).astype(dtype),
        jax.random.normal(k4, (num_pages, page_size, R)).astype(dtype),
    )


def _mla_spec(block_sizes, *, interpret):
    """The paged-kernel spec of MLA decoding over ``_mla``'s caches (latent 32, rope 8, pages of 4)."""
    return _paged.Spec(
        caches=(_paged.Cache(32, False), _paged.Cache(8, False)),
        score_caches=(0, 1),
        value_cache=0,
        value_width=32,
        page_size=4,
        scale=0.2,
        window=None,
        block_sizes=block_sizes,
        interpret=interpret,
        name="mla_decode",
    )


@pytest.mark.parametrize(
    "target,N,rows_per_block",
    [("tpu", 4, 64), ("gpu", 4, 64), ("gpu", 8, 16)],  # 8 heads x 3 tokens: two 16-row programs
)
def test_mla_decode_builds_match_reference(target, N, rows_per_block):
    q_a, q_r, c, k_r = _mla(jnp.float32, N=N)
    tables, lengths, q_pos = _batch(page_size=4)
    spec = _mla_spec(
        _paged.BlockSizes(pages_per_block=3, num_splits=2, rows_per_block=rows_per_block), interpret=True
    )
    out = jax.jit(lambda *a: _paged.attend(spec, target, True, [a[0], a[1]], [a[2], a[3]], *a[4:], 1))(
        q_a, q_r, c, k_r, tables, lengths, q_pos
    )
    want = md.mla_decode_reference(q_a, q_r, c, k_r, tables, lengths, q_pos, scale=0.2)
    assert_close(out, want, jnp.float32)


def test_mla_decode_public_wrapper_bf16():
    args = _mla(jnp.bfloat16)
    tables, lengths, q_pos = _batch(page_size=4)
    out = md.mla_decode(*args, tables, lengths, q_pos, scale=0.2, interpret=True)
    assert out.dtype == jnp.bfloat16 and out.shape == (3, 3, 4, 32)
    want = md.mla_decode_reference(*(x.astype(jnp.float32) for x in args), tables, lengths, q_pos, scale=0.2)
    assert_close(out, want, jnp.bfloat16)


# The XLA path (what llmarch.ops runs on CPU) against the references ----------------------------


def _pages_and_tables(rng, num_pages, page_size, lengths, width):
    """Per row a random set of distinct pages (never page 0, the serving trash page)."""
    free = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(lengths), width), np.int32)
    start = 0
    for r, n in enumerate(lengths):
        k = -(-int(n) // page_size)
        tables[r, :k] = free[start : start + k]
        start += k
    return tables


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_xla_matches_reference(window):
    rng = np.random.default_rng(0)
    P, ps, K, G, H, R, T = 16, 2, 2, 2, 8, 3, 5  # up to 7 pages a row: several blocks of pages
    lengths = np.array([7, 13, 5])
    tables = jnp.asarray(_pages_and_tables(rng, P, ps, lengths, width=7))
    q = jnp.asarray(rng.normal(size=(R, T, K * G, H)), jnp.float32)
    k_pages, v_pages = (jnp.asarray(rng.normal(size=(P, ps, K, H)), jnp.float32) for _ in range(2))
    positions = np.stack([n - T + np.arange(T) for n in lengths]).astype(np.int32)
    positions[2, :3] = -1  # padding queries
    positions = jnp.asarray(positions)
    want = pa.paged_attention_reference(
        q, k_pages, v_pages, tables, jnp.asarray(lengths), positions, sliding_window=window
    )
    got = pa.paged_attention_xla(
        q, k_pages, v_pages, tables, jnp.asarray(lengths), positions, sliding_window=window
    )
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.any(np.asarray(got)[2, :3])  # padding gives zeros


def test_paged_attention_xla_on_the_mixed_batch():
    """The kernels' batch: garbage table entries past each row's pages, decode rows padded."""
    q, k_pages, v_pages = _gqa(jnp.float32)
    tables, lengths, q_pos = _batch(page_size=4)
    for window in (None, 3):
        got = pa.paged_attention_xla(q, k_pages, v_pages, tables, lengths, q_pos, sliding_window=window)
        want = pa.paged_attention_reference(
            q, k_pages, v_pages, tables, lengths, q_pos, sliding_window=window
        )
        assert_close(got, want, jnp.float32)


def test_mla_decode_xla_matches_reference():
    rng = np.random.default_rng(1)
    P, ps, A, Rr, N, R, T = 10, 2, 16, 4, 3, 2, 3
    lengths = np.array([9, 4])
    tables = jnp.asarray(_pages_and_tables(rng, P, ps, lengths, width=5))
    ql, qr = (jnp.asarray(rng.normal(size=(R, T, N, w)), jnp.float32) for w in (A, Rr))
    c_kv = jnp.asarray(rng.normal(size=(P, ps, A)), jnp.float32)
    k_r = jnp.asarray(rng.normal(size=(P, ps, Rr)), jnp.float32)
    positions = jnp.asarray(np.stack([n - T + np.arange(T) for n in lengths]), jnp.int32)
    want = md.mla_decode_reference(ql, qr, c_kv, k_r, tables, jnp.asarray(lengths), positions, scale=0.3)
    got = md.mla_decode_xla(ql, qr, c_kv, k_r, tables, jnp.asarray(lengths), positions, scale=0.3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    tables, lengths, q_pos = _batch(page_size=4)
    args = _mla(jnp.float32)
    assert_close(
        md.mla_decode_xla(*args, tables, lengths, q_pos, scale=0.2),
        md.mla_decode_reference(*args, tables, lengths, q_pos, scale=0.2),
        jnp.float32,
    )


def test_bad_inputs_raise():
    q, k_pages, v_pages = _gqa(jnp.float32)
    tables, lengths, q_pos = _batch(page_size=4)
    with pytest.raises(
        ValueError,
        match=r"block_tables\[0, 2\]=16 points past the cache: it has "
        "16 pages",
    ):
        pa.paged_attention(q, k_pages, v_pages, tables.at[0, 2].set(16), lengths, q_pos)
    with pytest.raises(ValueError, match=r"lengths span \[5, 21\]: a table of 5 pages of 4"):
        pa.paged_attention(q, k_pages, v_pages, tables, lengths.at[0].set(21), q_pos)
    with pytest.raises(ValueError, match="4 heads, not a multiple of the cache's 3 KV heads"):
        pa.paged_attention(
            q, k_pages[:, :, :1].repeat(3, 2), v_pages[:, :, :1].repeat(3, 2), tables, lengths, q_pos
        )
    with pytest.raises(ValueError, match="q_positions has shape"):
        pa.paged_attention(q, k_pages, v_pages, tables, lengths, q_pos[:, :2])
    q_a, q_r, c, k_r = _mla(jnp.float32)
    with pytest.raises(ValueError, match="c_kv_pages has latent width 16 but q_latent has 32"):
        md.mla_decode(q_a, q_r, c[..., :16], k_r, tables, lengths, q_pos, scale=0.2)
    with pytest.raises(ValueError, match="k_rope_pages has shape"):
        md.mla_decode(q_a, q_r, c, k_r[:8], tables, lengths, q_pos, scale=0.2)


@pytest.mark.parametrize(
    "H,page_size,match",
    [
        (16, 16, "head dim H=16 with K=2 KV heads does not tile on TPU"),
        (128, 4, "page_size=4 does not tile on GPU"),
    ],
)
def test_tiles_a_target_rejects_raise_at_trace_time(H, page_size, match):
    """Without interpret, tracing builds the TPU and the Triton kernels: each checks its tiles."""
    sds = jax.ShapeDtypeStruct
    args = (
        sds((2, 1, 4, H), jnp.bfloat16),
        sds((64, page_size, 2, H), jnp.bfloat16),
        sds((64, page_size, 2, H), jnp.bfloat16),
        sds((2, 8), jnp.int32),
        sds((2,), jnp.int32),
        sds((2, 1), jnp.int32),
    )
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(pa.paged_attention, *args)


def test_gpu_rows_per_block_must_tile():
    q_a, q_r, c, k_r = _mla(jnp.float32)
    tables, lengths, q_pos = _batch(page_size=4)
    spec = _mla_spec(_paged.BlockSizes(rows_per_block=24), interpret=False)
    with pytest.raises(ValueError, match=r"rows_per_block=24 .* power of two >= 16"):
        _paged.attend(spec, "gpu", False, [q_a, q_r], [c, k_r], tables, lengths, q_pos, 1)
