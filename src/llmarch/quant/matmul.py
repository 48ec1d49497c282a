"""``x @ W`` for a quantized ``W``: the XLA path of ``llmarch.ops.quantized_matmul``.

It reads the stored (packed) weights at every call and keeps nothing dequantized between calls, so
a quantized model's weights take their stored bytes in memory and in each decoding step's traffic.

The weight is walked in tiles of rows of K (whole groups, or a part of one), each tile unpacked and
dequantized to float32 and multiplied into an accumulator: a tile (about 1 MiB of float32) stays in
cache between being written and being read by the matmul, so memory sees the stored bytes only.
Each tile's float32 copy is made explicit with an ``optimization_barrier``: fused into the dot, the
dequantization takes XLA:CPU off its GEMM library onto a naive loop (49 ms against 7 ms for the
float32 matmul at batch 1, ``[4096, 8192]``), and a fused multiply-reduce is slower still.

What it buys, and what it does not: memory holds the stored bytes only (a W8 ``small-20m`` is
22 MB against 84 MB in float32), but XLA:CPU dequantizes at fewer elements per second than it
streams float32 weights, so on this project's 2-core CPU this path decodes ``small-20m`` at
batch 1 at 0.71x float32's speed in W8 and 0.58x in W4g128 (measured side by side). Decode rows
(M <= 16) of integer weights therefore run ``kernels_cpu.quantized_matmul`` on CPU (widening
in registers: 2.1x float32's batch-1 speed in W8, experiment 12), and the Pallas kernel on
TPU/GPU; this path serves prefill, FP8 weights and sharded programs.

Packed 4/3-bit weights are never interleaved back: the even rows of K meet the low nibbles and
the odd rows the high ones (``x[:, 0::2]``, ``x[:, 1::2]``), which groups (of even size) keep together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmarch.quant.tensor import QuantizedTensor, nibbles

TILE_ELEMENTS = 1 << 18  # float32 elements of one dequantized tile (1 MiB: an L2's worth)


def quantized_matmul_xla(x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """``[M, N]`` in x's dtype: ``x [M, K] @ dequantize(qt) [K, N]`` for a qt without batch axes."""
    if len(qt.shape) != 2:
        raise ValueError(f"quantized_matmul takes a [K, N] weight; got logical shape {qt.shape}")
    K, N = qt.shape
    if x.shape[-1] != K:
        raise ValueError(f"x {x.shape} does not contract with the quantized weight [K={K}, N={N}]")
    xf = x.astype(jnp.float32)
    packed = qt.kind == "int" and qt.bits < 8
    x_parts = (xf[:, 0::2], xf[:, 1::2]) if packed else (xf,)  # [M, K'] each
    rows = qt.q.shape[0]  # stored rows K' (K/2 when packed)
    if qt.kind == "fp8":
        per_scale = qt.group_size or rows  # stored rows per scale row
    else:
        per_scale = (qt.group_size or K) // (2 if packed else 1)
    tile = _tile_rows(rows, per_scale, N)

    def tile_product(i: jax.Array) -> jax.Array:
        r0 = i * tile
        q = jax.lax.dynamic_slice_in_dim(qt.q, r0, tile, axis=0)  # [tile, N]
        planes = nibbles(q, signed=qt.zero is None) if packed else (q,)
        scale = _scale_rows(qt.scale, r0, tile, per_scale)
        if qt.kind == "fp8" and qt.group_size is not None:  # square blocks: expand along N too
            scale = jnp.repeat(scale, qt.group_size, axis=-1)[:, :N]
        zero = None if qt.zero is None else _scale_rows(qt.zero.astype(jnp.float32), r0, tile, per_scale)
        out = jnp.zeros((x.shape[0], N), jnp.float32)
        for plane, xs in zip(planes, x_parts, strict=True):
            w = plane.astype(jnp.float32)
            w = (w if zero is None else w - zero) * scale
            # Without the barrier XLA fuses the dequantization into the dot, which leaves the GEMM
            # library for a naive loop (7x slower than float32 at batch 1).
            w = jax.lax.optimization_barrier(w)
            out = out + jax.lax.dynamic_slice_in_dim(xs, r0, tile, axis=1) @ w
        return out

    count = rows // tile
    if count == 1:
        y = tile_product(jnp.int32(0))
    else:
        y, _ = jax.lax.scan(
            lambda acc, i: (acc + tile_product(i), None),
            tile_product(jnp.int32(0)),
            jnp.arange(1, count, dtype=jnp.int32),
        )
    return y.astype(x.dtype)


def _tile_rows(rows: int, per_scale: int, N: int) -> int:
    """The largest divisor of ``rows`` that is a multiple or a divisor of ``per_scale`` (a tile
    then needs whole scale rows, or one) and keeps a tile within ``TILE_ELEMENTS``; at least 1."""
    fits = [
        t
        for t in range(1, rows + 1)
        if rows % t == 0 and (t % per_scale == 0 or per_scale % t == 0) and t * N <= TILE_ELEMENTS
    ]
    return max(fits, default=1)


def _scale_rows(scale: jax.Array, r0: jax.Array, tile: int, per_scale: int) -> jax.Array:
    """The scale rows of stored rows ``[r0, r0 + tile)``, one per row: ``[tile, N']``."""
    if tile % per_scale == 0:
        s = jax.lax.dynamic_slice_in_dim(scale, r0 // per_scale, tile // per_scale, axis=0)
        return jnp.repeat(s, per_scale, axis=0)
    return jax.lax.dynamic_slice_in_dim(scale, r0 // per_scale, 1, axis=0)  # broadcasts over the tile
