"""MLA latent decoding over a paged latent cache (as FlashMLA does on GPUs).

Absorbed multi-head latent attention (DeepSeek-V2, arXiv 2405.04434) folds ``W_UK`` into
the query and ``W_UV`` into the output, so attention runs in the latent space: every query
head scores ``q_A·c_KV + q_R·k_R`` against one shared KV head and averages the latents
``c_KV`` themselves. The cache holds per token only ``c_KV`` (width A) and ``k_R`` (width R),
as two page pools ``[pages, page_size, A]`` and ``[pages, page_size, R]`` with block tables as in
``paged_attention``. All N heads of a token share every page read, so one program attends
``T·N`` query rows at once: a decode step becomes a matmul-shaped problem, which is what
lets it run near memory bandwidth.

``mla_decode_reference`` is MQA over ``[c_KV; k_R]`` with values ``[c_KV; 0]``, by way of
``paged_attention_reference``, the specification; ``mla_decode_xla`` is the fast XLA path
(``_paged_xla``, score parts ``q_A·c_KV + q_R·k_R`` without concatenation). The output is in
the latent space, ``[B,T,N,A]`` (the caller applies ``W_UV``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas import _common as common
from kernels_pallas import _paged
from kernels_pallas._paged import BlockSizes
from kernels_pallas._paged_xla import blocked_attention
from kernels_pallas.paged_attention import paged_attention_reference

__all__ = ["BlockSizes", "mla_decode", "mla_decode_reference", "mla_decode_xla"]


def mla_decode_reference(
    q_latent, q_rope, c_kv_pages, k_rope_pages, block_tables, lengths, q_positions, *, scale: float
) -> jax.Array:
    """``[B,T,N,A]``: softmax over visible keys of ``scale·(q_A·c_KV + q_R·k_R)``, times ``c_KV``."""
    A = q_latent.shape[-1]
    q = jnp.concatenate([q_latent, q_rope.astype(q_latent.dtype)], axis=-1)  # [B,T,N,A+R]
    k = jnp.concatenate([c_kv_pages, k_rope_pages.astype(c_kv_pages.dtype)], axis=-1)[:, :, None]
    v = jnp.concatenate([c_kv_pages, jnp.zeros_like(k_rope_pages, c_kv_pages.dtype)], axis=-1)[
        :, :, None
    ]  # [pages,ps,1,A+R]: the values are c_KV
    out = paged_attention_reference(
        q, k.astype(q.dtype), v.astype(q.dtype), block_tables, lengths, q_positions, scale=scale
    )
    return out[..., :A]


def mla_decode_xla(
    q_latent,
    q_rope,
    c_kv_pages,
    k_rope_pages,
    block_tables,
    lengths,
    q_positions,
    *,
    scale: float,
    c_kv_scales: jax.Array | None = None,
    k_rope_scales: jax.Array | None = None,
) -> jax.Array:
    """``[B,T,N,A]``: ``mla_decode_reference``'s function (up to float rounding) by
    ``_paged_xla.blocked_attention``: one KV head, keys ``[c_KV; k_R]`` as two score parts,
    values ``c_KV``. With ``c_kv_scales, k_rope_scales [pages,page_size,1]`` the pools are a
    quantized cache's (``llmarch.layers.kv_quant``), read as stored and scaled in the loop."""
    c, r = c_kv_pages[:, :, None], k_rope_pages[:, :, None]  # [P,ps,1,A], [P,ps,1,R]
    if c_kv_scales is None:
        return blocked_attention(
            (q_latent, q_rope), (c, r), c, block_tables, lengths, q_positions, scale=scale
        )
    cs, rs = c_kv_scales[:, :, None], k_rope_scales[:, :, None]  # [P,ps,1,1]
    return blocked_attention(
        (q_latent, q_rope),
        (c, r),
        c,
        block_tables,
        lengths,
        q_positions,
        scale=scale,
        k_scales=(cs, rs),
        v_scales=cs,
    )


def mla_decode(
    q_latent: jax.Array,
    q_rope: jax.Array,
    c_kv_pages: jax.Array,
    k_rope_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Absorbed-MLA attention over the paged latent cache; equals ``mla_decode_reference``.

    Args:
      q_latent: ``[B,T,N,A]``, the queries with ``W_UK`` folded in (``q_C W_UKᵀ``).
      q_rope: ``[B,T,N,R]``, the rotated RoPE queries.
      c_kv_pages: ``[pages, page_size, A]`` latent pool; k_rope_pages: ``[pages, page_size, R]``.
      block_tables, lengths, q_positions: as ``paged_attention`` (position -1: padding).
      scale: the softmax scale, MLA's ``1/sqrt(H + R)`` (times YaRN's mscale²) — not derivable
        from the widths here, so it is required.
    Returns:
      ``[B,T,N,A]`` latent outputs in ``q_latent``'s dtype.
    """
    common.check_rank("q_latent", q_latent, 4, "[B,T,N,A]")
    common.check_rank("q_rope", q_rope, 4, "[B,T,N,R]")
    common.check_rank("c_kv_pages", c_kv_pages, 3, "[pages, page_size, A]")
    common.check_rank("k_rope_pages", k_rope_pages, 3, "[pages, page_size, R]")
    B, T, N, A = q_latent.shape
    P, ps, Ac = c_kv_pages.shape
    R = q_rope.shape[-1]
    if q_rope.shape[:3] != (B, T, N):
        raise ValueError(f"q_rope has shape {q_rope.shape}: expected {(B, T, N, R)} like q_latent")
    if Ac != A:
        raise ValueError(f"c_kv_pages has latent width {Ac} but q_latent has {A}")
    if k_rope_pages.shape != (P, ps, R):
        raise ValueError(
            f"k_rope_pages has shape {k_rope_pages.shape}: expected {(P, ps, R)} "
            "(c_kv_pages' pages and page size, q_rope's width)"
        )
    _paged.check_tables(block_tables, lengths, q_positions, batch=B, queries=T, num_pages=P, page_size=ps)
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes={block_sizes!r} must be a mla_decode.BlockSizes")
    spec = _paged.Spec(
        caches=(_paged.Cache(A, per_head=False), _paged.Cache(R, per_head=False)),
        score_caches=(0, 1),
        value_cache=0,
        value_width=A,
        page_size=ps,
        scale=float(scale),
        window=None,
        block_sizes=block_sizes,
        interpret=bool(interpret),
        name="mla_decode",
    )
    out = _paged.run(
        spec,
        [q_latent, q_rope.astype(q_latent.dtype)],
        [c_kv_pages, k_rope_pages.astype(c_kv_pages.dtype)],
        block_tables,
        lengths,
        q_positions,
        num_kv_heads=1,
    )
    return out.astype(q_latent.dtype)
