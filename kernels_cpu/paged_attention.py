"""Decode attention over a paged float32 KV cache on CPU: the C++ kernel ``paged_attention.cc``
(see its header for why and how), called through ``jax.ffi``.

``llmarch.ops.paged_attention`` and ``ops.mla_decode`` take it under ``"auto"`` on the CPU
backend for a float32 cache (a quantized cache's pools stay on the XLA loop, which applies their
scales as it reads them) with at most ``MAX_T`` query positions per row, in an unsharded
program; ``kernels_pallas._paged_xla.blocked_attention`` and the ``*_reference`` functions are
what the tests compare it against. Inference only: it has no backward pass (nothing
differentiates a decode step; training attends through ``ops.attention``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_cpu.build import load

MAX_T = 16  # kMaxT in paged_attention.cc: query positions per row (decode, speculative verify)


def static_number(value) -> bool:
    """A concrete int or float (the kernel's ``scale`` and window are compile-time attributes;
    a traced scale stays on the XLA path)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def supports(T: int, *dtypes, scale=1.0, sliding_window=None) -> bool:
    """Whether dispatch sends a call with ``T`` query positions per row, these operand dtypes
    (queries and pools), ``scale`` and ``sliding_window`` here: all float32, ``1 <= T <= MAX_T``,
    a concrete scale, no window or an int one >= 1 (others stay on the XLA path, whose answer
    for them, e.g. zeros for a window of 0, is the reference's), and the kernel built."""
    f32 = all(jnp.dtype(d) == jnp.float32 for d in dtypes)
    window = sliding_window is None or (
        isinstance(sliding_window, (int, np.integer))
        and not isinstance(sliding_window, bool)
        and sliding_window >= 1
    )
    return f32 and 1 <= T <= MAX_T and static_number(scale) and window and load() is not None


def _check(qs, ks, v, tables, lengths, q_positions, scale, sliding_window) -> None:
    if not static_number(scale):
        raise ValueError(f"scale={scale!r} is invalid: the CPU kernel takes a concrete int or float")
    if load() is None:
        raise RuntimeError("the CPU kernels are unavailable; check kernels_cpu.build.unavailable()")
    B, T, N = qs[0].shape[:3]
    pages, ps, K, _ = v.shape
    if not 1 <= T <= MAX_T:
        raise ValueError(f"q has T={T} positions per row; the CPU kernel takes 1 to {MAX_T}")
    if K == 0 or N % K:
        raise ValueError(f"q's N={N} heads must be a multiple of the pools' K={K}")
    for q, k in zip(qs, ks, strict=True):
        if q.ndim != 4 or q.shape[:3] != (B, T, N) or k.shape != (pages, ps, K, q.shape[3]):
            raise ValueError(f"query part {q.shape} and key pool {k.shape} do not match v {v.shape}")
    if tables.ndim != 2 or tables.shape[0] != B or lengths.shape != (B,) or q_positions.shape != (B, T):
        raise ValueError(
            f"tables {tables.shape}, lengths {lengths.shape}, q_positions {q_positions.shape}: "
            f"must be [B, max_pages], [B], [B, T] with B={B}, T={T}"
        )
    if sliding_window is not None and (
        isinstance(sliding_window, bool)
        or not isinstance(sliding_window, (int, np.integer))
        or sliding_window < 1
    ):
        raise ValueError(f"sliding_window={sliding_window!r} is invalid: must be None or an int >= 1")
    operands = (*qs, *ks, v)
    if any(a.dtype != jnp.float32 for a in operands):
        raise ValueError(
            f"dtypes {[str(a.dtype) for a in operands]}: the CPU kernel takes float32 queries and pools"
        )


def paged_attention(
    qs: tuple[jax.Array, ...],
    k_pages: tuple[jax.Array, ...],
    v_pages: jax.Array,
    tables: jax.Array,
    lengths: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """``[B,T,N,H_v]`` float32: ``blocked_attention``'s function for one or two key parts.

    Args: as ``kernels_pallas._paged_xla.blocked_attention`` (float pools, no scales):
      ``qs`` ``[B,T,N,H_i]`` query parts, ``k_pages`` their ``[pages,ps,K,H_i]`` key pools,
      ``v_pages [pages,ps,K,H_v]``, ``tables [B,max_pages]``, ``lengths [B]``, ``q_positions
      [B,T]`` (-1: padding). Queries with no visible key get zeros. Table entries outside the pool
      are clamped into the pool, as the reference's ``gather_pages`` does (a valid table holds none).
    """
    if not 1 <= len(qs) <= 2:
        raise ValueError(f"{len(qs)} key parts; the CPU kernel takes 1 or 2")
    _check(qs, k_pages, v_pages, tables, lengths, q_positions, scale, sliding_window)
    B, T, N = qs[0].shape[:3]
    operands = [a for pair in zip(qs, k_pages, strict=True) for a in pair]
    ints = [a.astype(jnp.int32) for a in (tables, lengths, q_positions)]
    name = "llmarch_paged_attention" if len(qs) == 1 else "llmarch_paged_attention2"
    return jax.ffi.ffi_call(
        name,
        jax.ShapeDtypeStruct((B, T, N, v_pages.shape[3]), jnp.float32),
        vmap_method="sequential",
    )(
        *operands,
        v_pages,
        *ints,
        scale=np.float32(scale),
        window=np.int64(0 if sliding_window is None else sliding_window),
    )
