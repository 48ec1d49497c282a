"""Attention over packed, causal, optionally windowed sequences with grouped KV heads.

``attention_reference`` is the specification that the Pallas flash-attention kernel must
equal; ``llmarch.ops`` uses it as the XLA implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    causal: bool,
    sliding_window: int | None,
) -> jax.Array:
    """``[B,T,S]`` boolean: may query t attend to key s."""
    q = q_positions[:, :, None]  # [B,T,1]
    k = kv_positions[:, None, :]  # [B,1,S]
    mask = jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), dtype=bool)
    if causal:
        mask &= k <= q
    if sliding_window is not None:
        mask &= q - k < sliding_window
    if q_segment_ids is not None:
        mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return mask


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention of ``q [B,T,N,H]`` over ``k, v [B,S,K,H]`` with ``N = K*G``.

    Causality and the window compare positions (not indices), so the same function serves
    training, prefill and decoding against a cache. Scores and softmax are float32. A query
    with no visible key (only possible with padding) gets a zero output, never NaN.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    scale = H**-0.5 if scale is None else scale
    qg = q.reshape(B, T, K, G, H)  # [B,T,K,G,H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                          causal=causal, sliding_window=sliding_window)[:, None, None]  # [B,1,1,T,S]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - jax.lax.stop_gradient(row_max))
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v)
    return out.reshape(B, T, N, H)  # [B,T,N,H]
