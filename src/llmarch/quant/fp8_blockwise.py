"""DeepSeek-V3's FP8 training numerics (technical report §3.3): fine-grained scales and promoted sums.

Why fine-grained: activations carry outlier channels, and one scale per tensor sized to the largest
value pushes every ordinary value towards e4m3's subnormals (or to zero), so the whole tensor pays
for one channel. DeepSeek-V3 (§3.3.2, "Fine-Grained Quantization") gives activations one scale per
``1 × 128`` tile along the contracted axis K (per token, per 128 channels) and weights one per
``128 × 128`` block, so an outlier costs precision only in its own tile. Why promotion: the H800's
FP8 tensor cores keep only about 14 bits of the running sum, so DeepSeek-V3 ("Increasing
Accumulation Precision") multiplies each 128-element chunk's partial sum by its two scales and adds
it into a float32 accumulator on the CUDA cores. This module is the numeric specification of both,
in jnp, testable on a CPU; ``delayed_scale``/``update_amax_history`` give the per-tensor delayed
scaling (TransformerEngine's amax history) that the recipe replaced, for comparison.

The numeric model, exactly (every operation float32, round-to-nearest-even, unless stated):

- Quantization of a tile or block ``t`` (§3.3.2 "Online Quantization": the scale comes from the
  values being quantized, every tensor in E4M3 per "Mantissa over Exponents"): ``amax = max|t|``;
  ``s = max(amax · fl(1/448), 2^-126)`` (448 is e4m3's largest finite value; the floor, float32's
  smallest normal, gives an all-zero tile the scale 2^-126 and values 0, and keeps ``s`` normal so
  its reciprocal is finite); ``r = fl(1/s)``, one true division per tile;
  ``q = e4m3(clip(t · r, -448, 448))``, one round-to-nearest-even cast to float8_e4m3fn (the clip
  saturates where e4m3fn would give NaN: ``t·r`` can pass 448 by an ulp of rounding, and delayed
  scales can be stale). Multiplying by a reciprocal rather than dividing is what XLA compiles
  ``t / s`` into anyway (it rewrites a division by a broadcast or a constant), so it is written out
  to make the result the same on every backend; DeepGEMM's reference cast likewise multiplies by
  ``448/amax``. Dequantization is ``float32(q) · s``. NaN and infinity propagate (unhandled);
  float32 subnormals are flushed by XLA:CPU, so tests keep to normal floats.
- The product ``y[m, n] = Σ_k x[m, k] w[k, n]`` of ``xq [M, K]`` (scales ``xs [M, K/128]``) and
  ``wq [K, N]`` (scales ``ws [K/128, N/128]``): for each K chunk ``c`` of 128, in order, split into
  ``128 / P`` sub-chunks of ``P = promote_every`` elements; within a sub-chunk the products
  ``float32(xq)·float32(wq)`` (exact: two 4-bit significands) are summed in float32 by a fixed
  pairwise tree (the first half plus the second half, elementwise, repeated until one remains),
  each addition rounded to nearest-even; each sub-chunk sum ``p`` is then promoted:
  ``acc ← acc + fl(p · fl(xs[m, c] · ws[c, n/128]))``, with ``acc`` starting at 0, sub-chunks and
  chunks in K order, the product rounded before the addition (no fused multiply-add: this keeps
  the model reproducible bit for bit in numpy; a GPU's FFMA would differ in the last bit).
  The tensor cores' limited-precision accumulator is modelled as this float32 tree, i.e. idealized:
  the H800's "around 14 bits" (§3.3.2) are not reproduced, so ``promote_every`` changes only the
  order of the float32 additions here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
SCALE_FLOOR = float(np.finfo(np.float32).tiny)  # 2^-126: the smallest scale (all-zero tiles)
TILE = 128  # DeepSeek-V3's tile (activations 1×128) and block (weights 128×128) edge


def scale_from_amax(amax: jax.Array, margin: int = 0) -> jax.Array:
    """The dequantization scale ``max(amax · 2^margin · fl(1/448), 2^-126)`` (float32) for an amax."""
    amax = jnp.asarray(amax, jnp.float32)
    if margin:
        amax = amax * jnp.float32(2.0**margin)  # exact: a power of two
    return jnp.maximum(amax * jnp.float32(1.0 / E4M3_MAX), jnp.float32(SCALE_FLOOR))


def to_e4m3(v: jax.Array, scale: jax.Array) -> jax.Array:
    """float8_e4m3fn of ``v · fl(1/scale)`` (float32, ``scale`` broadcast against ``v``): round to
    nearest even, saturating at ±448 (not NaN)."""
    scaled = v * (jnp.float32(1.0) / scale)
    return jnp.clip(scaled, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def _check_multiple(name: str, shape: tuple[int, ...], axis: int, size: int, what: str) -> None:
    dim = shape[axis]
    if dim == 0 or dim % size:
        raise ValueError(
            f"{name} has shape {shape}: its {what} ({dim}) must be a positive multiple of {size} "
            f"(pad it to {max(size, -(-dim // size) * size)})"
        )


def quantize_activation_tiles(x: jax.Array, tile: int = TILE) -> tuple[jax.Array, jax.Array]:
    """Online 1×``tile`` quantization of activations (§3.3.2: per token per 128 channels).

    Args:
      x: ``[..., K]``, any float dtype (computed in float32), K a multiple of ``tile``.
      tile: the tile's length along K.

    Returns:
      ``(q, s)``: float8_e4m3fn ``[..., K]`` and float32 scales ``[..., K/tile]``, ``x ≈ q·s``.
    """
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x has shape {x.shape}: it must have at least one axis, [..., K]")
    _check_multiple("x", x.shape, -1, tile, "last axis K")
    xt = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // tile, tile)  # [..., K/tile, tile]
    scale = scale_from_amax(jnp.max(jnp.abs(xt), axis=-1))  # [..., K/tile]
    return to_e4m3(xt, scale[..., None]).reshape(x.shape), scale


def quantize_weight_blocks(w: jax.Array, block: int = TILE) -> tuple[jax.Array, jax.Array]:
    """Online ``block``×``block`` quantization of a weight (§3.3.2: per 128 input × 128 output).

    Args:
      w: ``[K, N]``, any float dtype (computed in float32), K and N multiples of ``block``.
      block: the block's edge.

    Returns:
      ``(q, s)``: float8_e4m3fn ``[K, N]`` and float32 scales ``[K/block, N/block]``.
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w has shape {w.shape}: it must be a [K, N] matrix (2 axes), got {w.ndim}")
    _check_multiple("w", w.shape, 0, block, "input axis K")
    _check_multiple("w", w.shape, 1, block, "output axis N")
    K, N = w.shape
    wb = w.astype(jnp.float32).reshape(K // block, block, N // block, block)  # [K/b, b, N/b, b]
    scale = scale_from_amax(jnp.max(jnp.abs(wb), axis=(1, 3)))  # [K/b, N/b]
    return to_e4m3(wb, scale[:, None, :, None]).reshape(K, N), scale


def dequantize_activation_tiles(q: jax.Array, scale: jax.Array) -> jax.Array:
    """float32 ``[..., K]``: ``q [..., K]`` times its tile's scale ``scale [..., K/tile]``."""
    if q.ndim < 1 or scale.shape[:-1] != q.shape[:-1] or scale.shape[-1] == 0:
        raise ValueError(f"scale {scale.shape} does not match q {q.shape}: it must be [..., K/tile]")
    _check_multiple("q", q.shape, -1, scale.shape[-1], "last axis K (in tiles of K/scale.shape[-1])")
    tile = q.shape[-1] // scale.shape[-1]
    qt = q.astype(jnp.float32).reshape(*scale.shape, tile)  # [..., K/tile, tile]
    return (qt * scale[..., None]).reshape(q.shape)


def dequantize_weight_blocks(q: jax.Array, scale: jax.Array) -> jax.Array:
    """float32 ``[K, N]``: ``q [K, N]`` times its block's scale ``scale [K/b, N/b]``."""
    if q.ndim != 2 or scale.ndim != 2 or 0 in scale.shape:
        raise ValueError(f"q {q.shape} and scale {scale.shape} must be [K, N] and [K/b, N/b]")
    K, N = q.shape
    bk, bn = K // scale.shape[0], N // scale.shape[1]
    if bk != bn or bk * scale.shape[0] != K or bn * scale.shape[1] != N:
        raise ValueError(f"scale {scale.shape} does not tile q {q.shape} in square blocks b×b")
    qb = q.astype(jnp.float32).reshape(scale.shape[0], bk, scale.shape[1], bn)
    return (qb * scale[:, None, :, None]).reshape(K, N)


def _pairwise_sum(p: jax.Array, axis: int) -> jax.Array:
    """Sum over ``axis`` (a power-of-two length) by halving: first half + second half, repeated."""
    while p.shape[axis] > 1:
        h = p.shape[axis] // 2
        p = jax.lax.slice_in_dim(p, 0, h, axis=axis) + jax.lax.slice_in_dim(p, h, 2 * h, axis=axis)
    return jnp.squeeze(p, axis)


@functools.partial(jax.jit, static_argnames=("promote_every", "out_dtype"))
def fp8_blockwise_matmul_reference(
    xq: jax.Array,
    xs: jax.Array,
    wq: jax.Array,
    ws: jax.Array,
    *,
    promote_every: int = TILE,
    out_dtype=jnp.float32,
) -> jax.Array:
    """``x @ w`` from 1×128-tile activations and 128×128-block weights, with promoted partial sums.

    The model (module docstring): per 128-chunk of K, float32 pairwise sums of exact e4m3 products
    over each ``promote_every`` elements, each scaled by ``xs·ws`` and added into a float32
    accumulator in K order (§3.3.2, "Increasing Accumulation Precision"). The XLA program holds
    ``M × 128 × N`` float32 products per chunk and ``M × N × K / promote_every`` scaled partial sums:
    a specification, not a fast path.

    Args:
      xq: float8_e4m3fn ``[..., K]``; xs: float32 ``[..., K/128]`` (``quantize_activation_tiles``).
      wq: float8_e4m3fn ``[K, N]``; ws: float32 ``[K/128, N/128]`` (``quantize_weight_blocks``).
      promote_every: elements of K per promotion, a power of two dividing the tile (128).
      out_dtype: the output dtype (the accumulator is float32 throughout).

    Returns:
      ``[..., N]`` in ``out_dtype``.
    """
    if xq.ndim < 1 or wq.ndim != 2 or xq.shape[-1] != wq.shape[0]:
        raise ValueError(f"xq {xq.shape} and wq {wq.shape} must be [..., K] and [K, N] with the same K")
    K, N = wq.shape
    if xs.ndim != xq.ndim or xs.shape[:-1] != xq.shape[:-1] or ws.ndim != 2 or 0 in (*xs.shape, *ws.shape):
        raise ValueError(f"xs {xs.shape} and ws {ws.shape} must be [..., K/tile] and [K/b, N/b]")
    tile, block_n = K // xs.shape[-1], N // max(ws.shape[1], 1)
    if xs.shape[-1] * tile != K or ws.shape[0] * tile != K or ws.shape[1] * block_n != N:
        raise ValueError(
            f"xs {xs.shape} and ws {ws.shape} must tile K={K} in the same chunks (and ws tile N={N}); "
            "DeepSeek-V3 uses 128 for both"
        )
    if promote_every < 1 or tile % promote_every or promote_every & (promote_every - 1):
        raise ValueError(
            f"promote_every={promote_every} is invalid: must be a power of two dividing the tile {tile}, "
            "since each promotion applies one tile's scales"
        )
    lead = xq.shape[:-1]
    M, C, P = int(np.prod(lead, dtype=np.int64)), K // tile, promote_every
    x_c = xq.astype(jnp.float32).reshape(M, C, tile).transpose(1, 0, 2)  # [C, M, tile]
    w_c = wq.astype(jnp.float32).reshape(C, tile, N)  # [C, tile, N]
    xs_c = xs.astype(jnp.float32).reshape(M, C).T  # [C, M]
    ws_c = jnp.repeat(ws.astype(jnp.float32), block_n, axis=1)  # [C, N]

    def chunk(_, operands) -> tuple[None, jax.Array]:
        x, w, sx, sw = operands  # [M, tile], [tile, N], [M], [N]
        products = (x[:, :, None] * w[None]).reshape(M, tile // P, P, N)  # exact in float32
        partial = _pairwise_sum(products, axis=2)  # [M, tile/P, N]
        scaled = partial * (sx[:, None] * sw[None, :])[:, None, :]  # [M, tile/P, N]
        return None, scaled.transpose(1, 0, 2)  # [tile/P, M, N]

    # Two loops: the scaled partial sums are materialized by the first before the second adds them,
    # so XLA cannot fuse multiply and add into an FMA (an optimization_barrier does not stop it).
    _, terms = jax.lax.scan(chunk, None, (x_c, w_c, xs_c, ws_c))  # [C, tile/P, M, N]
    terms = terms.reshape(C * (tile // P), M, N)  # in K order
    acc, _ = jax.lax.scan(lambda acc, t: (acc + t, None), jnp.zeros((M, N), jnp.float32), terms)
    return acc.reshape(*lead, N).astype(out_dtype)


def quantize_per_tensor(x: jax.Array, scale: jax.Array) -> jax.Array:
    """float8_e4m3fn ``x · fl(1/scale)`` for one float32 ``scale`` (saturating: delayed scales can be
    stale)."""
    return to_e4m3(jnp.asarray(x).astype(jnp.float32), jnp.asarray(scale, jnp.float32))


def update_amax_history(history: jax.Array, x: jax.Array) -> jax.Array:
    """The history ``[H]`` with ``max|x|`` at index 0 and the oldest entry dropped (TE's roll).

    Delayed scaling (TransformerEngine) quantizes step t's tensor with a scale from steps before
    t, so the amax reduction need not finish before the cast; DeepSeek-V3 (§3.3.2) uses online
    scales instead, which cannot be stale when a value grows.
    """
    amax = jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)))
    return jnp.roll(jnp.asarray(history, jnp.float32), 1).at[0].set(amax)


def delayed_scale(amax_history: jax.Array, margin: int = 0) -> jax.Array:
    """The per-tensor scale ``max(history) · 2^margin · fl(1/448)`` (TE's "max" algorithm), floored."""
    amax_history = jnp.asarray(amax_history)
    if amax_history.ndim != 1 or amax_history.shape[0] == 0:
        raise ValueError(f"amax_history has shape {amax_history.shape}: it must be [H] with H >= 1")
    return scale_from_amax(jnp.max(amax_history), margin)
