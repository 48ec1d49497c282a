"""The XLA implementation that ``paged_attention`` and ``mla_decode`` share (no Pallas).

What ``llmarch.ops`` runs for these ops where it resolves to XLA (CPU, or ``impl="xla"``). The
``*_reference`` functions stay the specification: they gather every row's pages into a
contiguous cache and call ``attention_reference``: simple and plainly right, but they read
every table entry and build ``[B,S,K,H]`` copies. ``blocked_attention`` reads only the pages a
step needs, once, in contractions that XLA:CPU runs fast; it is what serving runs on CPU, reached
through ``llmarch.ops`` like any kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.intmath import cdiv

PAGES_PER_BLOCK = 2  # pages one iteration of the XLA path reads per row


def blocked_attention(
    qs: tuple[jax.Array, ...],
    k_pages: tuple[jax.Array, ...],
    v_pages: jax.Array,
    tables: jax.Array,
    lengths: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    k_scales: tuple[jax.Array, ...] | None = None,
    v_scales: jax.Array | None = None,
) -> jax.Array:
    """The XLA path of paged attention: a loop over blocks of pages with an online softmax.

    The same function as ``paged_attention_reference``/``mla_decode_reference`` (up to float
    rounding), computed the way flash-decoding does: each iteration gathers the next
    ``PAGES_PER_BLOCK`` pages of every row and folds them into a running max, denominator and
    output, and the loop stops after the longest row's last page (a dynamic trip count). So a
    step reads each row's pages once, never materializes the gathered cache, and costs what
    the longest sequence needs, not the table's width. Scores sum over (query, key) parts (MLA:
    ``q_A·c_KV + q_R·k_R``, no concatenation); contractions are batch-major (``BKG·S``), which
    XLA:CPU runs several times faster than the reference's ``BSKH->BTKGH`` value einsum.

    Args:
      qs: ``[B,T,N,H_i]`` query parts; k_pages: matching ``[pages,ps,K,H_i]`` key pools.
      v_pages: ``[pages,ps,K,H_v]``; tables ``[B,max_pages]``; lengths ``[B]``; q_positions
      ``[B,T]`` (-1 pad).
      k_scales, v_scales: a quantized cache's (int8 / float8) scale pools, ``[pages,ps,K,1]``
        per key part and for the values (``llmarch.layers.kv_quant``), or None for a float cache.
        The loop reads the stored pages and multiplies each key's scale into its scores and each
        value's into its softmax weight, so nothing of the pool is dequantized up front.
    Returns:
      ``[B,T,N,H_v]``; padding queries (and queries with no visible key) get zeros.
    """
    B, T, N = qs[0].shape[:3]
    ps, K, Hv = v_pages.shape[1:]
    G = N // K
    pb = min(PAGES_PER_BLOCK, tables.shape[1])  # pages per block
    blocks = cdiv(tables.shape[1], pb)
    tables = jnp.pad(tables, ((0, 0), (0, blocks * pb - tables.shape[1])))  # pads: the trash page
    qg = [q.reshape(B, T, K, G, -1).transpose(0, 2, 3, 1, 4) for q in qs]  # [B,K,G,T,H_i]
    qp = q_positions[:, :, None]  # [B,T,1]
    longest = jnp.max(jnp.where(jnp.any(q_positions >= 0, axis=1), lengths, 0))
    trips = cdiv(longest, pb * ps)

    def block_scales(pool: jax.Array, pages: jax.Array) -> jax.Array:
        """``[B,K,1,1,pb*ps]``: the scales of a block's tokens, laid out like its scores."""
        return pool[pages].reshape(B, pb * ps, K).transpose(0, 2, 1)[:, :, None, None, :]

    def part_scores(q: jax.Array, kp: jax.Array, ks: jax.Array | None, pages: jax.Array) -> jax.Array:
        keys = kp[pages].reshape(B, pb * ps, K, -1)
        if ks is None:
            return jnp.einsum("BKGTH,BSKH->BKGTS", q, keys, preferred_element_type=jnp.float32)
        s = jnp.einsum("BKGTH,BSKH->BKGTS", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
        return s * block_scales(ks, pages)

    parts_scales = (None,) * len(qs) if k_scales is None else k_scales

    def body(carry):
        i, top, denom, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(tables, i * pb, pb, axis=1)  # [B,pb]
        scores = (
            sum(part_scores(q, kp, ks, pages) for q, kp, ks in zip(qg, k_pages, parts_scales, strict=True))
            * scale
        )  # [B,K,G,T,pb*ps]
        kv = i * pb * ps + jnp.arange(pb * ps, dtype=jnp.int32)[None, None, :]  # slot s: position s
        visible = (kv <= qp) & (kv < lengths[:, None, None])  # [B,T,pb*ps]; qp = -1 sees nothing
        if sliding_window is not None:
            visible &= qp - kv < sliding_window
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1))  # finite: top starts at -1e30
        weights = jnp.exp(scores - new_top[..., None])
        rescale = jnp.exp(top - new_top)
        values = v_pages[pages].reshape(B, pb * ps, K, Hv)
        if v_scales is None:
            p = weights.astype(values.dtype)
        else:  # the value scales folded into the weights; the values converted as stored
            p, values = (
                (weights * block_scales(v_scales, pages)).astype(qs[0].dtype),
                values.astype(qs[0].dtype),
            )
        acc = acc * rescale[..., None] + jnp.einsum(
            "BKGTS,BSKH->BKGTH", p, values, preferred_element_type=jnp.float32
        )
        return i + 1, new_top, denom * rescale + jnp.sum(weights, axis=-1), acc

    init = (
        jnp.int32(0),
        jnp.full((B, K, G, T), -1e30, jnp.float32),
        jnp.zeros((B, K, G, T), jnp.float32),
        jnp.zeros((B, K, G, T, Hv), jnp.float32),
    )
    _, _, denom, acc = jax.lax.while_loop(lambda c: c[0] < trips, body, init)
    out = acc / jnp.where(denom == 0, 1.0, denom)[..., None]  # [B,K,G,T,H_v]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, Hv).astype(qs[0].dtype)
