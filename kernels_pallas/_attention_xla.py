"""The XLA implementation of ``attention`` (no Pallas): what ``llmarch.ops`` runs on CPU.

``attention_reference`` is the specification, and differentiating it is correct but slow on
XLA:CPU: autodiff keeps the normalized probabilities ``[B,K,G,T,S]`` of every layer for the
backward pass (stacked over a scanned run's layers, in a buffer the scan zero-fills and copies),
materializes the masked scores for the row maximum, divides the whole ``[T,S]`` matrix by the
row sums, and differentiates through the masking ``where`` and the division. ``attention_xla``
computes the same function with a hand-written backward pass, as FlashAttention does without
its tiling (at the sequence lengths a CPU trains on, the ``[T,S]`` matrix of one layer fits
in cache-friendly passes):

- forward: scores, row max, ``exp``, row sums, ``P·V``; the output is divided by the row sums
  (``[T,H]``, not ``[T,S]``); it keeps only ``q, k, v``, the output and the row log-sum-exp;
- backward: the probabilities are recomputed from the scores and the log-sum-exp, and
  ``dS = P ∘ (dP − rowsum(dO ∘ O))`` (the softmax Jacobian in one fused pass).

Scores and softmax are float32 whatever the input dtype, as in the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.flash_attention import attention_mask


def attention_xla(
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
    """``attention_reference``'s function (up to float rounding), values and gradients.

    Args:
      q: ``[B,T,N,H]``; k, v: ``[B,S,K,H]`` with ``N = K*G``.
      q_positions ``[B,T]``, kv_positions ``[B,S]``, segment ids (optional, both or neither),
      causal, sliding_window, scale: as in ``attention_reference``.
    Returns:
      ``[B,T,N,H]`` in v's dtype; a query with no visible key gets zeros.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    masks = (q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    return _attention(float(scale), bool(causal), sliding_window, q, k, v, masks)


def _mask(masks, causal: bool, window: int | None) -> jax.Array:
    """``[B,1,1,T,S]``: the reference's mask, broadcast over ``K, G``."""
    return attention_mask(*masks, causal=causal, sliding_window=window)[:, None, None]


def _heads_major(q: jax.Array, K: int) -> jax.Array:
    """``[B,T,N,H] -> [B,K,G,T,H]``: batch-major operands, so every contraction below is a
    plain batched matmul and the ``[T,S]`` matrices never need a transpose."""
    B, T, N, H = q.shape
    return q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)


def _scores(qh: jax.Array, kh: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """``[B,K,G,T,S]`` float32 scaled scores, ``-inf`` where masked."""
    s = jnp.einsum("BKGTH,BKSH->BKGTS", qh, kh, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask, s, -jnp.inf)


def _forward(scale, causal, window, q, k, v, masks):
    B, T, N, H = q.shape
    K = k.shape[2]
    qh = _heads_major(q, K)  # [B,K,G,T,H]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,S,H]
    s = _scores(qh, kh, _mask(masks, causal, window), scale)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # a row with no visible key
    p = jnp.exp(s - row_max)  # [B,K,G,T,S], 0 where masked
    denom = jnp.sum(p, axis=-1, keepdims=True)  # [B,K,G,T,1]
    o = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v.dtype), vh, preferred_element_type=jnp.float32)
    o = o / jnp.where(denom == 0, 1.0, denom)
    # The row log-sum-exp: P = exp(S - lse) in the backward pass. An empty row keeps P = 0
    # through the mask, so its lse only needs to be finite.
    lse = jnp.where(denom == 0, 0.0, row_max + jnp.log(jnp.where(denom == 0, 1.0, denom)))
    out = o.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(v.dtype)  # [B,T,N,H]
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(scale, causal, window, q, k, v, masks):
    return _forward(scale, causal, window, q, k, v, masks)[0]


def _attention_fwd(scale, causal, window, q, k, v, masks):
    out, lse = _forward(scale, causal, window, q, k, v, masks)
    return out, (q, k, v, masks, out, lse)


def _attention_bwd(scale, causal, window, residuals, d_out):
    q, k, v, masks, out, lse = residuals
    B, T, N, H = q.shape
    K = k.shape[2]
    qh = _heads_major(q, K)  # [B,K,G,T,H]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,S,H]
    doh = _heads_major(d_out, K)  # [B,K,G,T,H]
    p = jnp.exp(_scores(qh, kh, _mask(masks, causal, window), scale) - lse)  # [B,K,G,T,S]
    # dV and dK contract the [T,S] matrices over (G, T), their major axes: written as [H, S]
    # products (the small [T,H] operand transposed, the [T,S] one read as stored), XLA:CPU
    # copies no [B,K,G,T,S] matrix into another layout first (two such copies a layer, ~1/6 of
    # a small Llama's train step), only [T,H]-sized operands and results.
    dv = jnp.einsum("BKGTH,BKGTS->BKHS", doh, p.astype(v.dtype), preferred_element_type=jnp.float32)
    dp = jnp.einsum("BKGTH,BKSH->BKGTS", doh, vh, preferred_element_type=jnp.float32)
    # rowsum(dO ∘ O) = rowsum(P ∘ dP): the softmax Jacobian's correction term, from [T,H] arrays.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B,T,N]
    delta = delta.reshape(B, T, K, N // K).transpose(0, 2, 3, 1)[..., None]  # [B,K,G,T,1]
    ds = (p * (dp - delta) * scale).astype(q.dtype)  # [B,K,G,T,S]
    dq = jnp.einsum("BKGTS,BKSH->BKGTH", ds, kh, preferred_element_type=jnp.float32)
    dk = jnp.einsum("BKGTH,BKGTS->BKHS", qh, ds, preferred_element_type=jnp.float32)
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)
    dk = dk.transpose(0, 3, 1, 2).astype(k.dtype)  # [B,K,H,S] -> [B,S,K,H]
    dv = dv.transpose(0, 3, 1, 2).astype(v.dtype)
    return dq, dk, dv, jax.tree.map(lambda _: None, masks)


_attention.defvjp(_attention_fwd, _attention_bwd)
