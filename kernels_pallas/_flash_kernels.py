"""The Pallas kernels of flash attention (forward, ``dq``, ``dk dv``) and the pieces they share.

``flash_attention.py`` builds their ``pallas_call``s and holds the public function. Refs are
tiles: ``q_ref [bq,H]``, ``k_ref``/``v_ref [S_pad,H]`` (forward, dq), positions and segment ids
as columns ``[rows,1]`` or rows ``[1,cols]``. With ``ranged`` (the GPU build) the first two
refs are ``[1,1]`` tiles holding the loop's tile range (``_tile_ranges``) and the loop body has
no branch, so Triton can pipeline its loads; otherwise (TPU, where a branch is cheap) the loop
covers every tile and skips those that position bounds prove invisible.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import _common as common

# The log-sum-exp given to a query that sees no key: exp(s - LSE_EMPTY) = 0 for any score.
LSE_EMPTY = 1e30


def _dot_nt(a, b):
    """``a [m,k] · b[n,k]ᵀ -> [m,n]`` in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    """``a [m,k] · b[k,n] -> [m,n]`` in float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _and(a, b):
    return b if a is None else a & b


def _mask(q_pos, kv_pos, q_seg, kv_seg, kv_valid, *, causal, window):
    """Which (query, key) pairs may attend; the arguments broadcast against each other
    (``[rows,1]`` against ``[1,cols]``, either way round). ``None`` means "all"."""
    mask = None
    if causal:
        mask = kv_pos <= q_pos
    if window is not None:
        mask = _and(mask, q_pos - kv_pos < window)
    if q_seg is not None:
        mask = _and(mask, q_seg == kv_seg)
    if kv_valid is not None:
        mask = _and(mask, kv_valid)
    return mask


def _visible(q_pos, kv_pos, *, causal, window):
    """Scalar: can any query of the tile see any key of the tile (from position bounds only)?
    ``None`` when nothing can be ruled out (no causality, no window)."""
    ok = None
    if causal:
        ok = jnp.min(kv_pos) <= jnp.max(q_pos)
    if window is not None:
        ok = _and(ok, jnp.min(q_pos) - jnp.max(kv_pos) < window)
    return ok


def _maybe(pred, fn, carry):
    """``fn(carry)`` where ``pred`` holds (a scalar or None: always), else ``carry``."""
    if pred is None:
        return fn(carry)
    return lax.cond(pred, fn, lambda c: c, carry)


def _valid_index(start, size, length, *, axis):
    """Boolean ``[1,size]`` (axis=1) or ``[size,1]`` (axis=0): index < length. None if all are."""
    if length is None:
        return None
    shape = (1, size) if axis == 1 else (size, 1)
    return start + lax.broadcasted_iota(jnp.int32, shape, axis) < length


# ----------------------------------------------------------------------------------------------
# Kernels. Refs are tiles: q_ref [bq,H], k_ref/v_ref [S_pad,H] (forward, dq), positions and
# segment ids as columns [rows,1] or rows [1,cols].


def fwd_kernel(*refs, scale, causal, window, block_kv, kv_len, has_seg, ranged):
    if ranged:  # GPU: loop over the visible key tiles only, no branch in the loop
        lo_ref, hi_ref, *refs = refs
    if has_seg:
        qpos_ref, kvpos_ref, qseg_ref, kvseg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    else:
        qpos_ref, kvpos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        qseg_ref = kvseg_ref = None
    q = q_ref[...]
    q_pos = qpos_ref[...]  # [bq,1]
    q_seg = None if qseg_ref is None else qseg_ref[...]
    bq, H = q.shape

    def body(j, carry):
        start = pl.multiple_of(j * block_kv, block_kv)
        kv_pos = kvpos_ref[:, pl.ds(start, block_kv)]  # [1,bk]

        def step(carry):
            acc, m, l = carry
            k = k_ref[pl.ds(start, block_kv), :]
            v = v_ref[pl.ds(start, block_kv), :]
            s = _dot_nt(q, k) * scale  # [bq,bk]
            kv_seg = None if kvseg_ref is None else kvseg_ref[:, pl.ds(start, block_kv)]
            mask = _mask(
                q_pos,
                kv_pos,
                q_seg,
                kv_seg,
                _valid_index(start, block_kv, kv_len, axis=1),
                causal=causal,
                window=window,
            )
            if mask is not None:
                s = jnp.where(mask, s, common.MASKED)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            p = jnp.exp(s - m_new)
            if mask is not None:
                p = jnp.where(mask, p, 0.0)  # a fully masked row keeps l = 0, not a uniform average
            alpha = jnp.exp(m - m_new)
            l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
            acc = alpha * acc + _dot_nn(p.astype(v.dtype), v)
            return acc, m_new, l

        if ranged:
            return step(carry)
        return _maybe(_visible(q_pos, kv_pos, causal=causal, window=window), step, carry)

    init = (
        jnp.zeros((bq, H), jnp.float32),
        jnp.full((bq, 1), common.MASKED, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )
    lo, hi = (lo_ref[0, 0], hi_ref[0, 0]) if ranged else (0, k_ref.shape[0] // block_kv)
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, LSE_EMPTY, m + jnp.log(l_safe))


def dq_kernel(*refs, scale, causal, window, block_kv, kv_len, has_seg, ranged):
    if ranged:
        lo_ref, hi_ref, *refs = refs
    if has_seg:
        (
            qpos_ref,
            kvpos_ref,
            qseg_ref,
            kvseg_ref,
            q_ref,
            k_ref,
            v_ref,
            do_ref,
            lse_ref,
            delta_ref,
            dq_ref,
        ) = refs
    else:
        qpos_ref, kvpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        qseg_ref = kvseg_ref = None
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq,1]
    q_pos = qpos_ref[...]
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, dq):
        start = pl.multiple_of(j * block_kv, block_kv)
        kv_pos = kvpos_ref[:, pl.ds(start, block_kv)]

        def step(dq):
            k = k_ref[pl.ds(start, block_kv), :]
            v = v_ref[pl.ds(start, block_kv), :]
            kv_seg = None if kvseg_ref is None else kvseg_ref[:, pl.ds(start, block_kv)]
            mask = _mask(
                q_pos,
                kv_pos,
                q_seg,
                kv_seg,
                _valid_index(start, block_kv, kv_len, axis=1),
                causal=causal,
                window=window,
            )
            p = jnp.exp(_dot_nt(q, k) * scale - lse)  # [bq,bk]
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            ds = p * (_dot_nt(do, v) - delta)
            return dq + _dot_nn(ds.astype(k.dtype), k)

        if ranged:
            return step(dq)
        return _maybe(_visible(q_pos, kv_pos, causal=causal, window=window), step, dq)

    lo, hi = (lo_ref[0, 0], hi_ref[0, 0]) if ranged else (0, k_ref.shape[0] // block_kv)
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def dkv_kernel(*refs, scale, causal, window, block_q, kv_len, kv_block, has_seg, ranged):
    """dk, dv of one key tile, summed over the G query heads of its KV head: the transposed
    problem (keys as rows), so every matmul is ``a·b`` or ``a·bᵀ``."""
    if ranged:
        lo_ref, hi_ref, *refs = refs
    if has_seg:
        (
            qpos_ref,
            kvpos_ref,
            qseg_ref,
            kvseg_ref,
            q_ref,
            k_ref,
            v_ref,
            do_ref,
            lse_ref,
            delta_ref,
            dk_ref,
            dv_ref,
        ) = refs
    else:
        qpos_ref, kvpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
        qseg_ref = kvseg_ref = None
    k, v = k_ref[...], v_ref[...]  # [bk,H]
    kv_pos = kvpos_ref[...]  # [bk,1]
    kv_seg = None if kvseg_ref is None else kvseg_ref[...]
    kv_valid = _valid_index(pl.program_id(2) * kv_block, kv_block, kv_len, axis=0)
    G, T_pad = q_ref.shape[0], q_ref.shape[1]
    # (head g, query tile i) pairs, i over [first, first + n_q): the tiles that see this one.
    first, n_q = (lo_ref[0, 0], hi_ref[0, 0] - lo_ref[0, 0]) if ranged else (0, T_pad // block_q)
    per_head = jnp.maximum(n_q, 1)  # n_q = 0 runs no step; avoid a division by zero

    def body(idx, carry):
        g, i = lax.div(idx, per_head), first + lax.rem(idx, per_head)
        start = pl.multiple_of(i * block_q, block_q)
        q_pos = qpos_ref[:, pl.ds(start, block_q)]  # [1,bq]

        def step(carry):
            dk, dv = carry
            q = q_ref[g, pl.ds(start, block_q), :]
            do = do_ref[g, pl.ds(start, block_q), :]
            lse = lse_ref[g, :, pl.ds(start, block_q)]  # [1,bq]
            delta = delta_ref[g, :, pl.ds(start, block_q)]
            q_seg = None if qseg_ref is None else qseg_ref[:, pl.ds(start, block_q)]
            mask = _mask(q_pos, kv_pos, q_seg, kv_seg, kv_valid, causal=causal, window=window)
            p_t = jnp.exp(_dot_nt(k, q) * scale - lse)  # [bk,bq]
            if mask is not None:
                p_t = jnp.where(mask, p_t, 0.0)
            dv = dv + _dot_nn(p_t.astype(do.dtype), do)
            ds_t = p_t * (_dot_nt(v, do) - delta)
            dk = dk + _dot_nn(ds_t.astype(q.dtype), q)
            return dk, dv

        if ranged:
            return step(carry)
        return _maybe(_visible(q_pos, kv_pos, causal=causal, window=window), step, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, G * n_q, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
