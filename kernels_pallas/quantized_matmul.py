"""Weight-only quantized matmul: ``x [M,K] · W [K,N]`` with ``W`` stored as 8- or 4-bit integers.

The weight is ``W[k,n] = (q[k,n] − zero[k // g, n]) · scale[k // g, n]``: integers ``q`` with one
float scale (and, asymmetric, one integer zero point) per group of ``g`` consecutive input rows
and output column (``group_size=None``: one group spans all of K, i.e. per output channel).
Storage, as ``llmarch.quant`` writes it:

- ``bits=8``: ``q [K,N]`` int8 (symmetric) or uint8 (asymmetric, values 0..255).
- ``bits=4`` and ``bits=3``: ``q [K/2,N]`` uint8, two values per byte along K: row ``2i`` in the
  low nibble, row ``2i+1`` in the high one. Symmetric values are stored offset by +8 (0..15), so
  the offset acts as a zero point of 8; asymmetric ones are stored as they are. int3 uses the
  same nibbles (its values fit in 3 bits): it saves accuracy experiments, not bytes.
- ``scale [K/g,N]`` float (float32 as stored; cast to float32 here), ``zero [K/g,N]`` int8/uint8
  or None (symmetric).

The kernels read the packed bytes and dequantize each ``[block_k, block_n]`` tile in registers /
VMEM right before its dot: ``w = ((v − z)·s).astype(x.dtype)`` in float32, then a float32-
accumulated ``x·w``, so the weights cross memory at 1 or ½ byte per element, which is what makes
bandwidth-bound decoding faster. K tiles hold whole groups, or a group holds whole K tiles
(``block_k`` a multiple or a divisor of ``g``), so each tile's scales are ``[block_k/g, block_n]``
rows, broadcast over their group's rows in the kernel. For packed weights the wrapper splits
``x`` into its even and odd columns ``x_lo, x_hi [M,K/2]`` (one pass over the small activation),
so each nibble plane meets its own columns: ``x·W = x_lo·W_lo + x_hi·W_hi`` with no interleave
inside the kernel.

TPU (Mosaic): a grid (row tile, column tile, K tile), the K axis sequential into a float32 VMEM
accumulator; each tile's scales (and zero points) arrive as a ``[groups per tile, block_n]``
block of the scales reshaped ``[K tiles, groups per tile, N]`` (a block whose second-minor dim
is the whole axis, so any group count tiles). GPU (Triton): a grid (row tile, column tile), each
program looping over K tiles and loading them by offset.

Inference only: there is no VJP (the weights are integers and nothing trains through them).
Axes that are not a multiple of their tile are zero-padded per call; for the weights that is a
copy, so the default tiles halve until they divide K and N, and explicit ``block_k``/``block_n``
should divide them too.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import _common as common

__all__ = ["BITS", "BlockSizes", "dequantize_reference", "quantized_matmul", "quantized_matmul_reference"]

BITS = (8, 4, 3)
# Symmetric nibbles hold q + 8 (0..15): the offset is their zero point.
NIBBLE_OFFSET = 8


def _rows_per_byte(bits: int) -> int:
    return 1 if bits == 8 else 2


def dequantize_reference(
    q: jax.Array, scale: jax.Array, zero: jax.Array | None, *, bits: int, group_size: int | None
) -> jax.Array:
    """``W [K,N]`` float32 of the stored weight (see the module docstring for the layout)."""
    if bits == 8:
        v = q.astype(jnp.float32)  # [K,N]
        offset = 0.0
    else:
        b = q.astype(jnp.int32)  # [K/2,N]
        v = jnp.stack([b & 15, b >> 4], axis=1).reshape(2 * q.shape[0], q.shape[1])  # [K,N]
        v = v.astype(jnp.float32)
        offset = float(NIBBLE_OFFSET)
    K = v.shape[0]
    g = K if group_size is None else group_size
    z = offset if zero is None else jnp.repeat(zero.astype(jnp.float32), g, axis=0)  # [K,N]
    return (v - z) * jnp.repeat(scale.astype(jnp.float32), g, axis=0)


def quantized_matmul_reference(
    x: jax.Array,
    q: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None,
    *,
    bits: int,
    group_size: int | None,
) -> jax.Array:
    """``[..., N]`` in ``x``'s dtype: ``x [..., K]`` times the dequantized weight cast to ``x``'s
    dtype, float32 accumulation. The specification; it materializes ``W``."""
    w = dequantize_reference(q, scale, zero, bits=bits, group_size=group_size).astype(x.dtype)
    return jnp.einsum("...K,KN->...N", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles: ``block_m`` rows of ``x``, ``block_k`` input rows of ``W`` (unpacked count),
    ``block_n`` output columns; ``num_warps``, ``num_stages``: GPU only.

    A block larger than its axis shrinks to one tile; axes that are not a multiple are padded.
    ``block_k`` must be a multiple or a divisor of ``group_size``. On TPU ``block_m`` must be a
    multiple of 8, ``block_n`` of 128 and ``block_k`` of 128 (8-bit) or 256 (packed: ``x_lo``,
    ``x_hi`` tiles hold ``block_k/2`` columns); on GPU all are powers of two, ``block_m`` and
    ``block_n`` >= 16, ``block_k`` >= 16 (8-bit) or 32 (packed).
    """

    block_m: int = 128
    block_k: int = 512
    block_n: int = 256
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        common.check_positive("BlockSizes", **dataclasses.asdict(self))

    @classmethod
    def default(cls, target: str) -> BlockSizes:
        """Per-target tiles. Decoding's few rows shrink ``block_m`` to one tile (8 rows on TPU,
        16 on GPU); GPU's narrower ``block_n`` gives a decoding matmul more programs to spread
        over the SMs (its grid has no K axis)."""
        if target == "tpu":
            return cls(block_m=256, block_k=512, block_n=512)
        return cls(block_m=64, block_k=128, block_n=64, num_warps=4, num_stages=3)


@dataclasses.dataclass(frozen=True)
class _Static:
    bits: int
    group_size: int | None
    block_sizes: BlockSizes | None
    interpret: bool


@dataclasses.dataclass(frozen=True)
class _Tiles:
    bm: int
    bk: int  # unpacked rows of W per K tile
    bn: int
    Mp: int
    Kp: int
    Np: int
    groups_per_tile: int  # scale rows a K tile reads (R)
    tiles_per_group: int  # K tiles sharing one scale row (1 when a tile holds whole groups)


def _fit_k(block: int, K: int, pack: int, target: str, interpret: bool) -> int:
    """The K tile for a requested ``block_k`` (see ``BlockSizes``)."""
    if interpret:
        return min(block, common.round_up(K, pack))
    if target == "tpu":
        unit = 128 * pack
        if block >= K:
            return common.round_up(K, 8 * pack)  # one tile: whole (padded) axes need no alignment
        if block % unit:
            raise ValueError(
                f"BlockSizes.block_k={block} does not tile on TPU: must be a multiple of {unit} "
                f"(bits={'8' if pack == 1 else '4/3'}), or at least the extent K={K}"
            )
        return block
    min_gpu = 16 * pack
    if block & (block - 1) or block < min_gpu:
        raise ValueError(
            f"BlockSizes.block_k={block} does not tile on GPU (Triton): must be a power of two >= {min_gpu}"
        )
    return max(min(block, common.next_pow2(K)), min_gpu)


def _dividing(block: int, extent: int, unit: int) -> int:
    """``block`` halved (not below ``unit``) until it divides ``extent``; ``block`` if none does
    or if one tile covers the extent anyway."""
    b = block
    while extent > block and b >= unit:
        if extent % b == 0:
            return b
        b //= 2
    return block


def _tiles(st: _Static, target: str, interpret: bool, M: int, K: int, N: int) -> tuple[_Tiles, BlockSizes]:
    pack = _rows_per_byte(st.bits)
    bs = st.block_sizes
    if bs is None:
        # Default tiles that divide K and N where a smaller legal one does: a padded weight is
        # a copy per call, which would undo the bandwidth the packing saves.
        bs = BlockSizes.default(target)
        lane = 128 if target == "tpu" else 16
        bs = dataclasses.replace(
            bs, block_k=_dividing(bs.block_k, K, lane * pack), block_n=_dividing(bs.block_n, N, lane)
        )
    fit = functools.partial(common.fit_block, "BlockSizes", target=target, interpret=interpret, min_gpu=16)
    bm = fit("block_m", bs.block_m, M)
    bn = fit("block_n", bs.block_n, N, lane=True)
    bk = _fit_k(bs.block_k, K, pack, target, interpret)
    g = st.group_size
    if g is not None and bk >= K and bk % g:
        # One tile for all of K: it may grow to the next multiple of g (padding whole groups).
        bk = common.round_up(bk, math.lcm(g, 8 * pack if target == "tpu" else 1))
        if target == "gpu" and not interpret:
            bk = common.next_pow2(bk)
    if g is not None and bk % g and g % bk:
        raise ValueError(
            f"BlockSizes.block_k={bk} does not align with group_size={g}: K tiles must hold whole "
            "groups or split one evenly (a multiple or a divisor of the group size)"
        )
    if bk % pack:
        raise ValueError(f"BlockSizes.block_k={bk} is odd: packed weights hold rows in pairs")
    Kp = common.round_up(K, bk)
    if g is None:
        g = Kp  # per channel: one scale row for every tile
    R, per_group = (bk // g, 1) if bk >= g else (1, g // bk)
    seg = bk // pack // R  # packed rows sharing one scale row within a tile
    if target == "tpu" and not interpret and R > 1 and seg % 8:
        raise ValueError(
            f"group_size={g} gives {seg}-row groups of packed weights: TPU broadcasts scales over "
            "multiples of 8 rows (use a larger group_size)"
        )
    t = _Tiles(bm, bk, bn, common.round_up(M, bm), Kp, common.round_up(N, bn), R, per_group)
    return t, bs


# ----------------------------------------------------------------------------------------------
# Kernels


def _over_rows(a: jax.Array, rows: int) -> jax.Array:
    """``a [R,bn]`` -> ``[rows,bn]``: each of the R rows repeated over its ``rows / R`` rows."""
    R, bn = a.shape
    if R == 1:
        return jnp.broadcast_to(a, (rows, bn))
    return jnp.broadcast_to(a[:, None, :], (R, rows // R, bn)).reshape(rows, bn)


def _tile_product(xs, v, s, z, *, packed: bool) -> jax.Array:
    """``Σ x·w [bm,bn]`` float32 of one K tile: ``xs`` the x tiles (one; or ``x_lo, x_hi``),
    ``v [rows,bn]`` the stored integers, ``s, z [R,bn]`` the tile's scale and zero-point rows
    (``z`` None: symmetric)."""
    rows = v.shape[0]
    s = _over_rows(s.astype(jnp.float32), rows)
    # 8-bit integers widen to int32 before anything else: the one conversion from them that
    # both Mosaic and Triton take for every 8-bit type (signed or not) and tile shape.
    if z is not None:
        offset = _over_rows(z.astype(jnp.int32).astype(jnp.float32), rows)
    else:
        offset = float(NIBBLE_OFFSET) if packed else None  # symmetric int8: q itself
    b = v.astype(jnp.int32)
    planes = (b & 15, b >> 4) if packed else (b,)  # even input rows in the low nibble, odd in the high
    acc = None
    for x, p in zip(xs, planes, strict=True):
        p = p.astype(jnp.float32)
        w = ((p if offset is None else p - offset) * s).astype(x.dtype)
        d = lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        acc = d if acc is None else acc + d
    return acc


def _tpu_kernel(*refs, num_x: int, packed: bool, has_zero: bool):
    x_refs, (q_ref, s_ref), rest = refs[:num_x], refs[num_x : num_x + 2], refs[num_x + 2 :]
    z_ref = rest[0] if has_zero else None
    out_ref, acc_ref = rest[-2:]
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    z = z_ref[...] if has_zero else None
    acc_ref[...] += _tile_product([r[...] for r in x_refs], q_ref[...], s_ref[...], z, packed=packed)

    @pl.when(kk == pl.num_programs(2) - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _gpu_kernel(*refs, num_x: int, packed: bool, has_zero: bool, t: _Tiles, k_rows: int):
    x_refs, (q_ref, s_ref), rest = refs[:num_x], refs[num_x : num_x + 2], refs[num_x + 2 :]
    z_ref = rest[0] if has_zero else None
    out_ref = rest[-1]
    i, n = pl.program_id(0), pl.program_id(1)
    rows, cols = pl.ds(i * t.bm, t.bm), pl.ds(n * t.bn, t.bn)

    def body(kk, acc):
        ks = pl.ds(pl.multiple_of(kk * k_rows, k_rows), k_rows)
        sb = common.div(kk, t.tiles_per_group)
        z = z_ref[sb, :, cols] if has_zero else None
        xs = [r[rows, ks] for r in x_refs]
        return acc + _tile_product(xs, q_ref[ks, cols], s_ref[sb, :, cols], z, packed=packed)

    acc = lax.fori_loop(0, t.Kp // t.bk, body, jnp.zeros((t.bm, t.bn), jnp.float32))
    out_ref[rows, cols] = acc.astype(out_ref.dtype)


def _call(st: _Static, target: str, interpret: bool, x, q, scale, zero):
    """``[M,N]`` for ``x [M,K]`` with the ``target`` build of the kernel."""
    M, K = x.shape
    N = q.shape[1]
    pack = _rows_per_byte(st.bits)
    t, bs = _tiles(st, target, interpret, M, K, N)
    kr = t.bk // pack  # stored rows per K tile
    x = common.pad_axis(common.pad_axis(x, 0, t.Mp), 1, t.Kp)
    xs = [x] if pack == 1 else [x[:, 0::2], x[:, 1::2]]  # [Mp,Kp/2] each: even, odd columns
    q = common.pad_axis(common.pad_axis(q, 0, t.Kp // pack), 1, t.Np)
    # Scale rows [K tiles or groups, R, N]: a tile's block is its R rows (whole second-minor axis).
    num_groups = t.Kp // t.bk * t.groups_per_tile if t.tiles_per_group == 1 else scale.shape[0]

    def rows3(a):
        a = common.pad_axis(common.pad_axis(a, 0, num_groups), 1, t.Np)
        return a.reshape(num_groups // t.groups_per_tile, t.groups_per_tile, t.Np)

    operands = [*xs, q, rows3(scale)] + ([rows3(zero)] if zero is not None else [])
    kind = dict(num_x=len(xs), packed=pack == 2, has_zero=zero is not None)
    out_shape = jax.ShapeDtypeStruct((t.Mp, t.Np), x.dtype)
    if target == "tpu":
        R, per = t.groups_per_tile, t.tiles_per_group
        x_spec = pl.BlockSpec((t.bm, kr), lambda i, n, k: (i, k))
        s_spec = pl.BlockSpec((None, R, t.bn), lambda i, n, k: (common.div(k, per), 0, n))
        in_specs = [x_spec] * len(xs) + [pl.BlockSpec((kr, t.bn), lambda i, n, k: (k, n)), s_spec]
        out = pl.pallas_call(
            functools.partial(_tpu_kernel, **kind),
            grid=(t.Mp // t.bm, t.Np // t.bn, t.Kp // t.bk),
            in_specs=in_specs + ([s_spec] if zero is not None else []),
            out_specs=pl.BlockSpec((t.bm, t.bn), lambda i, n, k: (i, n)),
            out_shape=out_shape,
            scratch_shapes=[pltpu.VMEM((t.bm, t.bn), jnp.float32)],
            compiler_params=common.compiler_params(
                target, interpret, semantics=("parallel", "parallel", "arbitrary")
            ),
            interpret=interpret,
            name="quantized_matmul",
        )(*operands)
    else:
        whole = [pl.BlockSpec(a.shape, lambda i, n, nd=a.ndim: (0,) * nd) for a in operands]
        out = pl.pallas_call(
            functools.partial(_gpu_kernel, **kind, t=t, k_rows=kr),
            grid=(t.Mp // t.bm, t.Np // t.bn),
            in_specs=whole,
            out_specs=pl.BlockSpec((t.Mp, t.Np), lambda i, n: (0, 0)),
            out_shape=out_shape,
            compiler_params=common.compiler_params(
                target, interpret, num_warps=bs.num_warps, num_stages=bs.num_stages
            ),
            interpret=interpret,
            name="quantized_matmul",
        )(*operands)
    return out[:M, :N]


# ----------------------------------------------------------------------------------------------
# Public wrapper


def quantized_matmul(
    x: jax.Array,
    q: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None = None,
    *,
    bits: int,
    group_size: int | None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x · W`` with ``W`` dequantized tile by tile inside the kernel (see
    ``quantized_matmul_reference``). Inference only: no VJP.

    Args:
      x: ``[..., K]`` float activations (float32 or bfloat16).
      q: ``[K,N]`` int8/uint8 (``bits=8``) or ``[K/2,N]`` uint8 nibbles (``bits=4`` or ``3``).
      scale: ``[K/g,N]`` float (``[1,N]`` for ``group_size=None``).
      zero: ``[K/g,N]`` int8/uint8 zero points (asymmetric), or None (symmetric).
      bits: 8, 4 or 3. group_size: g dividing K, or None (per output channel).
      block_sizes: tiles; default ``BlockSizes.default(target)``.
      interpret: run with the Pallas interpreter (any backend).
    Returns:
      ``[..., N]`` in ``x``'s dtype (float32 accumulation).
    """
    _check(x, q, scale, zero, bits, group_size, block_sizes)
    st = _Static(int(bits), group_size, block_sizes, bool(interpret))
    lead, N = x.shape[:-1], q.shape[1]
    x2 = x.reshape(-1, x.shape[-1])  # [M,K]
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, N), x.dtype)

    def build(target, interp):
        return lambda x, q, s, *z: _call(st, target, interp, x, q, s, z[0] if z else None)

    out = common.dispatch(build, x2, q, scale, *([zero] if zero is not None else []), interpret=st.interpret)
    return out.reshape(*lead, N)


def _check(x, q, scale, zero, bits, group_size, block_sizes) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits={bits!r} is invalid: must be one of {BITS}")
    if np.ndim(x) < 1:
        raise ValueError(f"x has shape {np.shape(x)}: expected [..., K]")
    common.check_dtype("x", x, (jnp.floating,))
    common.check_rank("q", q, 2, "[K,N]" if bits == 8 else "[K/2,N] (two values per byte)")
    if bits == 8:
        if q.dtype not in (jnp.int8, jnp.uint8):
            raise TypeError(f"q has dtype {q.dtype}: bits=8 weights are int8 or uint8")
    elif q.dtype != jnp.uint8:
        raise TypeError(f"q has dtype {q.dtype}: bits={bits} weights are uint8 (two nibbles per byte)")
    K = q.shape[0] * _rows_per_byte(bits)
    N = q.shape[1]
    if x.shape[-1] != K:
        raise ValueError(
            f"x has K={x.shape[-1]} columns but q {tuple(q.shape)} holds K={K} rows (bits={bits})"
        )
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or K % group_size
    ):
        raise ValueError(f"group_size={group_size!r} is invalid: must be None or a positive divisor of K={K}")
    groups = 1 if group_size is None else K // group_size
    common.check_dtype("scale", scale, (jnp.floating,))
    if tuple(np.shape(scale)) != (groups, N):
        raise ValueError(
            f"scale has shape {tuple(np.shape(scale))}: expected ({groups}, {N}) [K/g,N] for "
            f"group_size={group_size}"
        )
    if zero is not None:
        common.check_dtype("zero", zero, (jnp.integer,))
        if tuple(np.shape(zero)) != (groups, N):
            raise ValueError(f"zero has shape {tuple(np.shape(zero))}: expected scale's ({groups}, {N})")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes={block_sizes!r} must be a quantized_matmul.BlockSizes")
