"""Paged attention for decoding with a paged KV cache (vLLM's PagedAttention, arXiv 2309.06180).

The cache is a pool of pages, ``k_pages, v_pages [pages, page_size, K, H]``; sequence ``b`` owns
the pages ``block_tables[b, :]`` in order, and its first ``lengths[b]`` keys are valid. One
call serves a batch that mixes decode steps (one query token) with chunked-prefill chunks
(several query tokens): queries are ``q [B,T,N,H]`` at ``q_positions [B,T]``, causal on
positions; a row with fewer than T tokens pads with position ``-1`` (those outputs are
zeros). New keys and values are written to the cache *before* the call (their positions
are ``< lengths``). GQA: ``N = K*G``, the G query heads of a KV head share its pages.

``paged_attention_reference`` gathers the pages into a contiguous cache and calls
``attention_reference``: the specification. ``paged_attention_xla`` is the fast XLA path
(``_paged_xla``: blocks of pages, online softmax) and the kernel (``_paged``) reads only the
pages a query can see.
Decoding has no backward pass, so there is no ``custom_vjp``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas import _common as common
from kernels_pallas import _paged
from kernels_pallas._paged import BlockSizes
from kernels_pallas._paged_xla import blocked_attention
from kernels_pallas.flash_attention import attention_reference

__all__ = [
    "BlockSizes",
    "gather_pages",
    "paged_attention",
    "paged_attention_reference",
    "paged_attention_xla",
]


def gather_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """``[pages, page_size, ...] -> [B, max_pages*page_size, ...]``: each sequence contiguous.
    Table entries past a sequence's pages may hold anything (they are clamped, then masked)."""
    P, ps = pages.shape[:2]
    B, max_pages = block_tables.shape
    seq = pages[jnp.clip(block_tables, 0, P - 1)]  # [B, max_pages, ps, ...]
    return seq.reshape(B, max_pages * ps, *pages.shape[2:])


def paged_attention_reference(
    q,
    k_pages,
    v_pages,
    block_tables,
    lengths,
    q_positions,
    *,
    sliding_window: int | None = None,
    scale: float | None = None,
):
    """``[B,T,N,H]``: ``attention_reference`` over each sequence's first ``lengths[b]`` keys."""
    B = q.shape[0]
    k, v = gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables)  # [B,S,K,H]
    S = k.shape[1]
    kv_positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    kv_valid = (kv_positions < lengths[:, None]).astype(jnp.int32)  # [B,S]
    return attention_reference(
        q,
        k,
        v,
        q_positions=q_positions,
        kv_positions=kv_positions,
        q_segment_ids=jnp.ones(q.shape[:2], jnp.int32),
        kv_segment_ids=kv_valid,
        causal=True,
        sliding_window=sliding_window,
        scale=scale,
    )


def paged_attention_xla(
    q,
    k_pages,
    v_pages,
    block_tables,
    lengths,
    q_positions,
    *,
    sliding_window: int | None = None,
    scale: float | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
):
    """``[B,T,N,H]``: ``paged_attention_reference``'s function (up to float rounding) by
    ``_paged_xla.blocked_attention``, reading each row's visible pages once, in ``q``'s dtype.

    With ``k_scales, v_scales [pages,page_size,K,1]`` the pools are a quantized cache's (int8 or
    float8, ``llmarch.layers.kv_quant``): the function is then the reference's over the
    dequantized pools ``pages * scales``, read as stored."""
    H = q.shape[-1]
    return blocked_attention(
        (q,),
        (k_pages,),
        v_pages,
        block_tables,
        lengths,
        q_positions,
        scale=H**-0.5 if scale is None else scale,
        sliding_window=sliding_window,
        k_scales=None if k_scales is None else (k_scales,),
        v_scales=v_scales,
    )


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    q_positions: jax.Array,
    *,
    sliding_window: int | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of ``q`` over a paged KV cache; equals ``paged_attention_reference``.

    Args:
      q: ``[B,T,N,H]`` queries (T=1 for pure decoding).
      k_pages, v_pages: ``[pages, page_size, K, H]`` page pools, ``N = K*G``.
      block_tables: int ``[B, max_pages]``: sequence b's pages, in order.
      lengths: int ``[B]``: valid keys per sequence (including this step's, already written).
      q_positions: int ``[B,T]``: each query's position; ``-1`` for padding.
      sliding_window: a query at p sees keys ``s > p - sliding_window`` only.
      scale: multiplies ``q·k``; default ``H**-0.5``.
      block_sizes: ``BlockSizes`` (pages per TPU step, splits); default per target.
      interpret: run with the Pallas interpreter.
    Returns:
      ``[B,T,N,H]`` in ``q``'s dtype.
    Raises:
      ValueError: mismatched shapes or head counts; (when the tables are concrete) a table
        entry past the cache or a length past the table; on GPU a page size that does not tile.
    """
    common.check_rank("q", q, 4, "[B,T,N,H]")
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        common.check_rank(name, x, 4, "[pages, page_size, K, H]")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages has shape {k_pages.shape} but v_pages {v_pages.shape}")
    B, T, N, H = q.shape
    P, ps, K, Hk = k_pages.shape
    if Hk != H:
        raise ValueError(f"k_pages has head dim {Hk} but q has {H}")
    if N % K:
        raise ValueError(f"q has {N} heads, not a multiple of the cache's {K} KV heads (N = K*G)")
    _paged.check_tables(block_tables, lengths, q_positions, batch=B, queries=T, num_pages=P, page_size=ps)
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 0):
        raise ValueError(f"sliding_window={sliding_window!r} is invalid: must be a positive int")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes={block_sizes!r} must be a paged_attention.BlockSizes")
    spec = _paged.Spec(
        caches=(_paged.Cache(H, per_head=True), _paged.Cache(H, per_head=True)),
        score_caches=(0,),
        value_cache=1,
        value_width=H,
        page_size=ps,
        scale=float(H**-0.5 if scale is None else scale),
        window=sliding_window,
        block_sizes=block_sizes,
        interpret=bool(interpret),
        name="paged_attention",
    )
    caches = [k_pages.reshape(P, ps, K * H), v_pages.reshape(P, ps, K * H)]  # free: contiguous
    out = _paged.run(spec, [q], caches, block_tables, lengths, q_positions, K)
    return out.astype(q.dtype)
