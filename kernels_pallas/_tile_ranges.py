"""Which key tiles a query tile can see, from the tiles' position and segment bounds.

The flash-attention kernels loop over key tiles. A tile no query can see (above the causal
diagonal, outside the sliding window, in another packed segment) contributes nothing, and on
GPU skipping it with a branch inside the loop costs more than it saves: Triton cannot pipeline
the loads of a loop whose body is a conditional. So on GPU the loop runs over a range of tiles
computed here, outside the kernel, from the bounds alone, and the kernel masks inside it as
before. The range covers every visible tile; tiles inside it that are invisible (possible with
non-monotone positions or segments) are masked to zero, so the range affects speed only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _bounds(x: jax.Array, tile: int) -> tuple[jax.Array, jax.Array]:
    """``[B,P]`` -> per-tile min and max ``[B,P//tile]``."""
    x = x.reshape(x.shape[0], -1, tile)
    return x.min(-1), x.max(-1)


def visible(q_pos, kv_pos, q_seg, kv_seg, *, block_q, block_kv, causal, window) -> jax.Array | None:
    """Boolean ``[B,Tp//block_q,Sp//block_kv]``: can any query of tile i see any key of tile j?
    Positions and segment ids are ``[B,Tp]`` / ``[B,Sp]`` int32, padded to whole tiles. ``None``
    when nothing can be ruled out."""
    vis = None
    if causal or window is not None:
        q_min, q_max = _bounds(q_pos, block_q)
        k_min, k_max = _bounds(kv_pos, block_kv)
        if causal:
            vis = k_min[:, None, :] <= q_max[:, :, None]
        if window is not None:
            near = q_min[:, :, None] - k_max[:, None, :] < window
            vis = near if vis is None else vis & near
    if q_seg is not None:
        s_min, s_max = _bounds(q_seg, block_q)
        t_min, t_max = _bounds(kv_seg, block_kv)
        overlap = (t_min[:, None, :] <= s_max[:, :, None]) & (t_max[:, None, :] >= s_min[:, :, None])
        vis = overlap if vis is None else vis & overlap
    return vis


def ranges(vis: jax.Array | None, shape: tuple[int, int, int], axis: int) -> tuple[jax.Array, jax.Array]:
    """``(lo, hi)``, int32, of ``shape`` without ``axis`` (``shape`` is ``vis``'s): ``[lo, hi)``
    spans every True along ``axis``, and ``lo == hi == 0`` where there is none. ``vis=None``
    (everything visible) gives the whole axis."""
    n = shape[axis]
    out_shape = tuple(s for d, s in enumerate(shape) if d != axis)
    if vis is None:
        return jnp.zeros(out_shape, jnp.int32), jnp.full(out_shape, n, jnp.int32)
    some = vis.any(axis)
    lo = jnp.argmax(vis, axis).astype(jnp.int32)
    hi = (n - jnp.argmax(jnp.flip(vis, axis), axis)).astype(jnp.int32)
    return jnp.where(some, lo, 0), jnp.where(some, hi, 0)
