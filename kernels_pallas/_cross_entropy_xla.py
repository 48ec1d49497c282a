"""The XLA path of the fused cross entropy (no Pallas): a loop over vocabulary chunks.

What ``llmarch.ops.cross_entropy`` runs where it resolves to XLA (CPU, or ``impl="xla"``); the
specification is ``cross_entropy.cross_entropy_reference``. Forward, ``lax.scan`` walks the
vocabulary ``chunk`` entries at a time with an online log-sum-exp (running max and scaled sum)
and picks each token's target logit from the chunk that holds it; backward, a second scan
recomputes each chunk's logits from the saved ``lse`` and adds ``dz·W_chunk`` to ``dx`` and
writes ``dzᵀ·x`` into the chunk's columns of ``dW``. Either way the largest temporary is one
``[B, chunk]`` float32 block instead of the ``[B,V]`` logits, for one more ``B·D·V`` matmul
(the backward's recomputation) than the plain loss.

The weight is sliced in place (``dynamic_slice`` along V, either layout), so nothing
weight-sized is copied. A vocabulary that is not a multiple of ``chunk`` ends with a chunk
shifted back to end at V: it overlaps its predecessor, and the overlapping entries, already
counted, are masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.intmath import cdiv

DEFAULT_CHUNK = 8192  # vocabulary entries per step: a [B, 8192] f32 block is 32 KiB per token


def _chunk(x, w, labels, i, chunk, transpose_w):
    """Chunk ``i``: ``(z [B,c] float32, hit [B,c], fresh [c], w_c [c,D], start)``; ``hit``: the
    target entries, ``fresh``: the entries no earlier chunk covered."""
    axis = 1 if transpose_w else 0
    V = w.shape[axis]
    start = jnp.minimum(i * chunk, V - chunk)  # the last chunk ends at V
    w_c = lax.dynamic_slice_in_dim(w, start, chunk, axis=axis)
    w_c = w_c.T if transpose_w else w_c  # [c,D]; XLA folds the transpose into the dots
    z = jnp.einsum("BD,VD->BV", x, w_c, preferred_element_type=jnp.float32)
    ids = start + jnp.arange(chunk, dtype=jnp.int32)
    fresh = ids >= i * chunk
    return z, (ids == labels[:, None]) & fresh, fresh, w_c, start


def _forward(x, w, labels, transpose_w, chunk):
    V = w.shape[1 if transpose_w else 0]

    def body(carry, i):
        m, s, target = carry
        z, hit, fresh, _, _ = _chunk(x, w, labels, i, chunk, transpose_w)
        z = jnp.where(fresh, z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))  # finite from the first chunk on
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        return (m_new, s, target + jnp.sum(jnp.where(hit, z, 0.0), axis=1)), None

    B = x.shape[0]
    init = (jnp.full((B,), -jnp.inf, jnp.float32), jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.float32))
    (m, s, target), _ = lax.scan(body, init, jnp.arange(cdiv(V, chunk)))
    lse = m + jnp.log(s)
    return lse - target, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def chunked_cross_entropy(x, w, labels, transpose_w: bool, chunk: int):
    """``(nll [B], lse [B])`` float32 of ``z = x·Wᵀ`` (``w [V,D]``, or ``[D,V]`` with
    ``transpose_w``; in ``x``'s dtype, ``chunk <= V``), ``chunk`` vocabulary entries at a time."""
    return _forward(x, w, labels, transpose_w, chunk)


def _fwd(x, w, labels, transpose_w, chunk):
    nll, lse = _forward(x, w, labels, transpose_w, chunk)
    return (nll, lse), (x, w, labels, lse)


def _bwd(transpose_w, chunk, res, cotangents):
    x, w, labels, lse = res
    g_nll, g_lse = (g.astype(jnp.float32)[:, None] for g in cotangents)
    axis = 1 if transpose_w else 0

    def body(carry, i):
        dx, dw = carry
        z, hit, fresh, w_c, start = _chunk(x, w, labels, i, chunk, transpose_w)
        dz = (g_nll + g_lse) * jnp.exp(z - lse[:, None]) - jnp.where(hit, g_nll, 0.0)
        dz = jnp.where(fresh, dz, 0.0).astype(x.dtype)  # [B,c]
        dx += jnp.einsum("BV,VD->BD", dz, w_c, preferred_element_type=jnp.float32)
        dw_c = jnp.einsum("BV,BD->VD", dz, x, preferred_element_type=jnp.float32)
        dw_c = dw_c.T if transpose_w else dw_c
        # Only the overlap of the last chunk was written before, and there dz is zero: add.
        old = lax.dynamic_slice_in_dim(dw, start, chunk, axis=axis)
        return (dx, lax.dynamic_update_slice_in_dim(dw, old + dw_c.astype(dw.dtype), start, axis=axis)), None

    V = w.shape[axis]
    init = (jnp.zeros(x.shape, jnp.float32), jnp.zeros(w.shape, w.dtype))
    (dx, dw), _ = lax.scan(body, init, jnp.arange(cdiv(V, chunk)))
    return dx.astype(x.dtype), dw, None


chunked_cross_entropy.defvjp(_fwd, _bwd)
