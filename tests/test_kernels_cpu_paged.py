"""Paged decode attention on CPU (``kernels_cpu.paged_attention``, C++ through XLA's FFI) against
``paged_attention_reference`` / ``mla_decode_reference``, and its dispatch from ``llmarch.ops``.

The batch is ``test_kernels_paged``'s: decode rows (one query, the rest padding at -1) beside a
chunked-prefill row, lengths that cut pages partway, garbage table entries past each row's pages.
Tolerance: float32, 2e-5 of the largest expected magnitude (summation order differs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels_cpu import needs_kernels
from test_kernels_cpu_dense import _assert_close
from test_kernels_paged import _batch, _gqa

from kernels_cpu import paged_attention as cp
from kernels_pallas import mla_decode as md
from kernels_pallas import paged_attention as pa
from llmarch import ops


@needs_kernels
@pytest.mark.parametrize("N,K,window", [(4, 2, None), (4, 2, 3), (8, 1, None), (2, 2, 1)])
@pytest.mark.parametrize("page_size", [4, 16])
def test_paged_kernel_matches_reference(N, K, window, page_size):
    q, k_pages, v_pages = _gqa(jnp.float32, N=N, K=K, page_size=page_size)
    tables, lengths, q_pos = _batch(page_size)
    tables = jnp.where(tables == 999, 0, tables)  # garbage entries inside the pool: still never read
    got = jax.jit(lambda *a: cp.paged_attention((a[0],), (a[1],), *a[2:], scale=0.3, sliding_window=window))(
        q, k_pages, v_pages, tables, lengths, q_pos
    )
    want = pa.paged_attention_reference(
        q, k_pages, v_pages, tables, lengths, q_pos, sliding_window=window, scale=0.3
    )
    _assert_close(got, want)
    np.testing.assert_array_equal(np.asarray(got)[0, 1:], 0)  # padding query slots get zeros


@needs_kernels
def test_paged_kernel_two_parts_is_mla_decode():
    A, R, N, ps, pages = 24, 8, 6, 4, 16
    k = jax.random.split(jax.random.key(3), 4)
    ql, qr = jax.random.normal(k[0], (3, 3, N, A)), jax.random.normal(k[1], (3, 3, N, R))
    c_kv, k_r = jax.random.normal(k[2], (pages, ps, A)), jax.random.normal(k[3], (pages, ps, R))
    tables, lengths, q_pos = _batch(ps)
    tables = jnp.where(tables == 999, 0, tables)
    got = jax.jit(lambda *a: ops.mla_decode(*a, scale=0.2, impl="cpu"))(
        ql, qr, c_kv, k_r, tables, lengths, q_pos
    )
    want = md.mla_decode_reference(ql, qr, c_kv, k_r, tables, lengths, q_pos, scale=0.2)
    _assert_close(got, want)


@needs_kernels
def test_ops_auto_takes_the_kernel_for_float_decode_only():
    q, k_pages, v_pages = _gqa(jnp.float32)
    tables, lengths, q_pos = _batch(4)
    args = (q, k_pages, v_pages, tables, lengths, q_pos)
    text = jax.jit(lambda *a: ops.paged_attention(*a)).lower(*args).as_text()
    assert "llmarch_paged_attention" in text
    xla = jax.jit(lambda *a: ops.paged_attention(*a, impl="xla")).lower(*args).as_text()
    assert "custom_call" not in xla
    _assert_close(jax.jit(lambda *a: ops.paged_attention(*a))(*args), pa.paged_attention_reference(*args))
    # bfloat16 and a quantized cache's pools stay on the XLA loop
    bf = [a.astype(jnp.bfloat16) for a in args[:3]]
    text = jax.jit(lambda *a: ops.paged_attention(*a)).lower(*bf, *args[3:]).as_text()
    assert "llmarch_paged_attention" not in text
    scales = jnp.ones((*k_pages.shape[:3], 1), jnp.float32)
    quant = jax.jit(lambda *a: ops.paged_attention(*a, k_scales=scales, v_scales=scales))(
        q, k_pages.astype(jnp.int8), v_pages.astype(jnp.int8), *args[3:]
    )
    assert np.isfinite(np.asarray(quant)).all()


@needs_kernels
def test_kernel_is_deterministic_under_vmap_and_scan():
    q, k_pages, v_pages = _gqa(jnp.float32)
    tables, lengths, q_pos = _batch(4)
    f = jax.jit(lambda q: ops.paged_attention(q, k_pages, v_pages, tables, lengths, q_pos, impl="cpu"))
    first = np.asarray(f(q))
    for _ in range(3):
        assert np.array_equal(np.asarray(f(q)), first)
    stacked = jnp.stack([q, 2 * q])
    got = jax.vmap(f)(stacked)
    _, scanned = jax.lax.scan(lambda c, x: (c, f(x)), 0, stacked)
    for out in (got, scanned):
        np.testing.assert_array_equal(np.asarray(out[0]), first)
        _assert_close(out[1], f(2 * q))


@needs_kernels
def test_lengths_past_the_table_read_only_its_pages():
    """A length and query position beyond the table's pages: the reference sees the table's
    positions only, and so does the kernel (it must not read past the row's table entries)."""
    q, k_pages, v_pages = _gqa(jnp.float32)
    tables = jnp.array([[3, 1], [2, 0], [5, 4]], jnp.int32)  # 2 pages of 4: positions 0..7
    lengths = jnp.array([10_000, 6, 9], jnp.int32)
    q_pos = jnp.array([[9_999, -1, -1], [2, 3, 5], [8, 7, -1]], jnp.int32)
    args = (q, k_pages, v_pages, tables, lengths, q_pos)
    _assert_close(ops.paged_attention(*args, impl="cpu"), pa.paged_attention_reference(*args))


def _long_rows(B=3, pages_per_row=30, ps=4, N=4, K=2, H=8, T=2, seed=5):
    """Rows long enough to be read in several parts (kPartPages = 8 pages each)."""
    k = jax.random.split(jax.random.key(seed), 4)
    pages = B * pages_per_row + 1
    q = jax.random.normal(k[0], (B, T, N, H))
    k_pages, v_pages = (jax.random.normal(x, (pages, ps, K, H)) for x in k[1:3])
    tables = jax.random.permutation(k[3], pages)[: B * pages_per_row].reshape(B, pages_per_row)
    lengths = jnp.array([pages_per_row * ps - 3 - 9 * b for b in range(B)], jnp.int32)
    q_pos = jnp.stack([lengths - 2, lengths - 1], axis=1)
    return q, k_pages, v_pages, tables.astype(jnp.int32), lengths, q_pos


@needs_kernels
@pytest.mark.parametrize("window", [None, 1, 5, 40])
def test_rows_read_in_parts_match_reference(window):
    args = _long_rows()
    got = ops.paged_attention(*args, impl="cpu", sliding_window=window)
    _assert_close(got, pa.paged_attention_reference(*args, sliding_window=window))


@needs_kernels
@pytest.mark.parametrize("ps,H,K,T", [(20, 72, 2, 5), (32, 64, 4, 1), (13, 16, 1, 3), (16, 40, 2, 2)])
def test_slot_blocks_and_head_tails_match_reference(ps, H, K, T):
    """The kernel scores and sums slots 16 at a time: pages longer, shorter and not a multiple
    of 16 slots, head sizes with and without a tail past a multiple of 16, all against the
    reference, with a window that starts inside a block."""
    q, k_pages, v_pages, tables, lengths, _ = _long_rows(pages_per_row=6, ps=ps, N=4, K=K, H=H, T=T)
    q_pos = lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None]
    args = (q, k_pages, v_pages, tables, lengths, q_pos)
    for window in (None, 23):
        got = ops.paged_attention(*args, impl="cpu", sliding_window=window)
        _assert_close(got, pa.paged_attention_reference(*args, sliding_window=window))


@needs_kernels
def test_a_rows_result_does_not_depend_on_its_batch():
    """A row's parts are fixed by the row alone: its bits are the same alone and in any batch."""
    q, k_pages, v_pages, tables, lengths, q_pos = _long_rows(B=4)
    batch = np.asarray(ops.paged_attention(q, k_pages, v_pages, tables, lengths, q_pos, impl="cpu"))
    for b in range(4):
        alone = ops.paged_attention(
            q[b : b + 1],
            k_pages,
            v_pages,
            tables[b : b + 1],
            lengths[b : b + 1],
            q_pos[b : b + 1],
            impl="cpu",
        )
        np.testing.assert_array_equal(np.asarray(alone)[0], batch[b])


@needs_kernels
def test_nan_scores_and_odd_tables_read_as_the_reference_does():
    q, k_pages, v_pages = _gqa(jnp.float32)
    tables, lengths, q_pos = _batch(4)
    # a NaN key in row 0's first page: its query's output is NaN, as the reference's is
    nan_keys = k_pages.at[tables[0, 0], 0, 0, 0].set(jnp.nan)
    args = (q, nan_keys, v_pages, tables, lengths, q_pos)
    got, want = ops.paged_attention(*args, impl="cpu"), pa.paged_attention_reference(*args)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(np.asarray(got)[0, 0]).any()
    # table entries outside the pool: clamped into it, as the reference's gather_pages does
    odd = tables.at[0, 1].set(-1).at[2, 0].set(99)
    args = (q, k_pages, v_pages, odd, lengths, q_pos)
    _assert_close(ops.paged_attention(*args, impl="cpu"), pa.paged_attention_reference(*args))


@needs_kernels
def test_what_the_kernel_cannot_take_stays_on_xla_under_auto():
    """A traced scale, a window of 0 or a fractional one: auto takes the XLA loop (the reference's
    answers), impl="cpu" says why it cannot."""
    q, k_pages, v_pages = _gqa(jnp.float32)
    tables, lengths, q_pos = _batch(4)
    args = (q, k_pages, v_pages, tables, lengths, q_pos)
    traced = jax.jit(lambda s: ops.paged_attention(*args, scale=s))
    assert "llmarch_paged_attention" not in traced.lower(0.5).as_text()
    _assert_close(traced(0.5), pa.paged_attention_reference(*args, scale=0.5))
    for window in (0, 3.5):
        _assert_close(
            ops.paged_attention(*args, sliding_window=window),
            pa.paged_attention_reference(*args, sliding_window=window),
        )
    with pytest.raises(ValueError, match="concrete scale"):
        jax.jit(lambda s: ops.paged_attention(*args, scale=s, impl="cpu"))(0.5)


@needs_kernels
def test_kernel_rejects_what_it_cannot_take():
    q, k_pages, v_pages = _gqa(jnp.float32)
    tables, lengths, q_pos = _batch(4)
    with pytest.raises(ValueError, match="T=17"):
        cp.paged_attention(
            (jnp.zeros((3, 17, 4, 16)),),
            (k_pages,),
            v_pages,
            tables,
            lengths,
            jnp.zeros((3, 17), jnp.int32),
            scale=1.0,
        )
    with pytest.raises(ValueError, match="sliding_window=0"):
        cp.paged_attention((q,), (k_pages,), v_pages, tables, lengths, q_pos, scale=1.0, sliding_window=0)
    with pytest.raises(ValueError, match="float32"):
        cp.paged_attention((q.astype(jnp.bfloat16),), (k_pages,), v_pages, tables, lengths, q_pos, scale=1.0)
    with pytest.raises(ValueError, match="impl='cpu' cannot take"):
        ops.paged_attention(q.astype(jnp.bfloat16), k_pages, v_pages, tables, lengths, q_pos, impl="cpu")


@needs_kernels
@pytest.mark.parametrize("window", [None, 3])
def test_contiguous_cache_attends_through_the_kernel_in_place(window):
    """``KVCache.attend`` on CPU: the paged kernel over the cache as B pages of S slots gives
    XLA's causal attention over every slot, junk past each row's last position included (what a
    rejected speculative proposal leaves), for one and several queries per row; a bfloat16 cache
    and impl="xla" stay on XLA's attention."""
    from llmarch.layers.attention import KVCache

    B, T, S, N, K, H = 3, 3, 16, 4, 2, 8
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, T, N, H))
    cache = KVCache(jax.random.normal(keys[1], (B, S, K, H)), jax.random.normal(keys[2], (B, S, K, H)))
    positions = jnp.array([[0, 1, 2], [5, 6, 7], [13, 14, 15]], jnp.int32)
    for t in (1, T):
        args = (q[:, :t], positions[:, :t])
        auto = jax.jit(lambda q, p: cache.attend(q, p, sliding_window=window))
        assert "llmarch_paged_attention" in auto.lower(*args).as_text()
        xla = jax.jit(lambda q, p: cache.attend(q, p, impl="xla", sliding_window=window))
        assert "llmarch_paged_attention" not in xla.lower(*args).as_text()
        want = xla(*args)
        _assert_close(auto(*args), want)
    half = KVCache(cache.k.astype(jnp.bfloat16), cache.v.astype(jnp.bfloat16))
    bf16 = jax.jit(lambda q, p: half.attend(q.astype(jnp.bfloat16), p))
    assert "llmarch_paged_attention" not in bf16.lower(q, positions).as_text()
