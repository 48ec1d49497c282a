"""Memory lookup for product-key memories (PKM, arXiv 1907.05242) and UltraMem (2411.12364).

Each token reads a weighted sum of a few rows of a large value table: ``out[b] = Σ_j
weights[b,j] · table[indices[b,j]]`` with ``table [M,D]`` and ``indices, weights [B,J]``
(J = heads × top-m picks per token; B is the flattened batch). Forward, the kernel gathers
only the picked rows (never a ``[B,J,D]`` intermediate in HBM); backward, ``d table`` is a
scatter-add of ``weights[b,j] · d out[b]`` into the picked rows only (the others stay zero)
and ``d weights[b,j] = table[indices[b,j]] · d out[b]``. Indices get no gradient.
``memory_lookup_grouped`` is the same read with UltraMem's implicit value expansion: each
pick adds into one of W output blocks, ``out [B,W,D]`` (W=1 is the plain lookup; the kernels
below always work on W blocks per token).

TPU: the picked rows arrive through BlockSpecs whose index maps read the indices (scalar
prefetch), ``picks_per_step`` rows per grid step; the scatter sorts the picks by row so
that every row's contributions are consecutive grid steps accumulating into one resident
output block (no atomics on TPU). Scalar prefetch lives in SMEM, so long inputs are cut
into calls of ``tokens_per_call`` tokens / ``entries_per_call`` picks. GPU (Triton): each
program gathers a ``[block_b, block_d]`` tile per pick by pointer offsets; the scatter is an
atomic add of each pick's row into a zero-initialized float32 gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels_pallas import _common as common


def memory_lookup_reference(table: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
    """``[B,D]``: ``Σ_j weights[b,j] · table[indices[b,j]]`` (float32 sum, ``table``'s dtype)."""
    rows = table[indices]  # [B,J,D]
    out = jnp.einsum("BJ,BJD->BD", weights.astype(jnp.float32), rows.astype(jnp.float32))
    return out.astype(table.dtype)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Work split of the memory-lookup kernels.

    Attributes:
      picks_per_step: TPU: table rows gathered per grid step (J is padded to a multiple).
      tokens_per_call: TPU: tokens per kernel call (bounds the SMEM of the indices).
      entries_per_call: TPU: picks per scatter call (same reason).
      block_b: GPU: tokens per program (a power of two).
      block_d: GPU: table columns per program (a power of two dividing D, or >= D).
      num_warps, num_stages: GPU only.
    """

    picks_per_step: int = 8
    tokens_per_call: int = 256
    entries_per_call: int = 16384
    block_b: int = 16
    block_d: int = 256
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        common.check_positive("BlockSizes", **dataclasses.asdict(self))

    @classmethod
    def default(cls, target: str) -> BlockSizes:
        return cls()


@dataclasses.dataclass(frozen=True)
class _Static:
    block_sizes: BlockSizes | None
    interpret: bool
    num_blocks: int  # W: output blocks per token (1: the plain lookup)


def _block_d(bs: BlockSizes, D: int, target: str, interpret: bool) -> int:
    bd = min(bs.block_d, D)
    if D % bd:
        raise ValueError(
            f"BlockSizes.block_d={bs.block_d} does not tile the table width D={D}: "
            "it must divide D (or be >= D)"
        )
    if not interpret and target == "gpu" and bd & (bd - 1):
        raise ValueError(
            f"block {bd} of the table width D={D} does not tile on GPU (Triton): it "
            "must be a power of two; choose BlockSizes.block_d accordingly"
        )
    return bd


def _block_b(bs: BlockSizes, B: int, target: str, interpret: bool) -> int:
    bb = min(bs.block_b, common.next_pow2(B))
    if not interpret and bb & (bb - 1):
        raise ValueError(
            f"BlockSizes.block_b={bs.block_b} does not tile on GPU (Triton): must be a power of two"
        )
    return bb


# ----------------------------------------------------------------------------------------------
# TPU. Every kernel works on W output blocks per token (W=1: the plain lookup): a pick adds
# into block ``blocks[b,j]`` through a one-hot select over the W rows (static shapes only).


def _onehot(blk, W):
    """``[W,1]`` float32: 1 at row ``blk``."""
    return (lax.broadcasted_iota(jnp.int32, (W, 1), 0) == blk).astype(jnp.float32)


def _gather_tpu_kernel(idx_ref, w_ref, *refs, r, J, grouped):
    blk_ref = refs[0] if grouped else None
    rows, out_ref = refs[grouped : grouped + r], refs[grouped + r]
    b, j = pl.program_id(0), pl.program_id(1)
    W = out_ref.shape[0]

    @pl.when(j == 0)
    def _():
        out_ref[...] = jnp.zeros_like(out_ref)

    acc = out_ref[...]  # [W,D] float32
    for i in range(r):
        e = b * J + j * r + i
        add = w_ref[e] * rows[i][...].astype(jnp.float32)  # [1,D]
        acc += add if blk_ref is None else _onehot(blk_ref[e], W) * add
    out_ref[...] = acc


def _dweights_tpu_kernel(idx_ref, *refs, r, J, grouped):
    blk_ref = refs[0] if grouped else None
    rows, dout_ref, dw_ref = refs[grouped : grouped + r], refs[grouped + r], refs[grouped + r + 1]
    b, j = pl.program_id(0), pl.program_id(1)
    dout = dout_ref[...].astype(jnp.float32)  # [W,D]
    lane = lax.broadcasted_iota(jnp.int32, (1, r), 1)
    dw = jnp.zeros((1, r), jnp.float32)
    for i in range(r):
        d = dout if blk_ref is None else _onehot(blk_ref[b * J + j * r + i], dout.shape[0]) * dout
        dw = jnp.where(lane == i, jnp.sum(rows[i][...].astype(jnp.float32) * d), dw)
    dw_ref[...] = dw


def _scatter_tpu_kernel(rows_ref, tok_ref, w_ref, prev_ref, dout_ref, out_ref):
    e = pl.program_id(0)
    first = (e == 0) | (rows_ref[e] != rows_ref[jnp.maximum(e - 1, 0)])

    @pl.when(first)  # a row's first pick: start from what earlier calls accumulated
    def _():
        out_ref[...] = prev_ref[...]

    out_ref[...] += w_ref[e] * dout_ref[...].astype(jnp.float32)


def _picks(bs, idx, *others):
    """Picks per step ``r`` and the picks padded to a multiple (row 0, weight 0, block 0)."""
    J = idx.shape[1]
    r = min(bs.picks_per_step, J)
    Jp = common.round_up(J, r)
    return r, Jp, [None if x is None else common.pad_axis(x, 1, Jp) for x in (idx, *others)]


def _row_specs(r, Jp, D):
    """BlockSpec i of ``r`` reads table row ``idx[b, j*r + i]`` (of ``table [M,1,D]``)."""
    return [
        pl.BlockSpec((None, 1, D), lambda b, j, idx_, *_, i=i: (idx_[b * Jp + j * r + i], 0, 0))
        for i in range(r)
    ]


def _tpu_gather(bs, interpret, table3, idx, w, blk, W):
    """``[B,W,D]`` float32 forward, in calls of ``tokens_per_call`` tokens."""
    B = idx.shape[0]
    D = table3.shape[2]
    r, Jp, (idx, w, blk) = _picks(bs, idx, w.astype(jnp.float32), blk)
    grouped = blk is not None
    outs = []
    for s in range(0, B, bs.tokens_per_call):
        chunk = [x[s : s + bs.tokens_per_call].reshape(-1) for x in (idx, w, blk) if x is not None]
        Bc = min(B - s, bs.tokens_per_call)
        out = pl.pallas_call(
            functools.partial(_gather_tpu_kernel, r=r, J=Jp, grouped=grouped),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=len(chunk),
                grid=(Bc, Jp // r),
                in_specs=_row_specs(r, Jp, D),
                out_specs=pl.BlockSpec((None, W, D), lambda b, j, *_: (b, 0, 0)),
            ),
            out_shape=jax.ShapeDtypeStruct((Bc, W, D), jnp.float32),
            compiler_params=common.compiler_params("tpu", interpret, semantics=("parallel", "arbitrary")),
            interpret=interpret,
            name="memory_lookup_fwd",
        )(*chunk, *([table3] * r))
        outs.append(out)
    return jnp.concatenate(outs, axis=0)


def _tpu_backward(bs, interpret, table3, idx, w, blk, W, dout):
    """``d_out [B,W,D]`` -> ``(d_table [M,D], d_weights [B,J])`` in float32."""
    B, J = idx.shape
    M, _, D = table3.shape
    r, Jp, (idx_p, blk_p) = _picks(bs, idx, blk)
    nj = Jp // r
    grouped = blk is not None

    # d weights: gather the picked rows again and dot them with d out.
    dws = []
    for s in range(0, B, bs.tokens_per_call):
        chunk = [x[s : s + bs.tokens_per_call].reshape(-1) for x in (idx_p, blk_p) if x is not None]
        Bc = min(B - s, bs.tokens_per_call)
        dw = pl.pallas_call(
            functools.partial(_dweights_tpu_kernel, r=r, J=Jp, grouped=grouped),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=len(chunk),
                grid=(Bc, nj),
                in_specs=[*_row_specs(r, Jp, D), pl.BlockSpec((None, W, D), lambda b, j, *_: (b, 0, 0))],
                out_specs=pl.BlockSpec((None, 1, r), lambda b, j, *_: (b * nj + j, 0, 0)),
            ),
            out_shape=jax.ShapeDtypeStruct((Bc * nj, 1, r), jnp.float32),
            compiler_params=common.compiler_params("tpu", interpret, semantics=("parallel", "parallel")),
            interpret=interpret,
            name="memory_lookup_dweights",
        )(*chunk, *([table3] * r), dout[s : s + bs.tokens_per_call])
        dws.append(dw.reshape(Bc, Jp))
    d_weights = jnp.concatenate(dws, axis=0)[:, :J]

    # d table: sort the picks by row, so each row's contributions are consecutive steps.
    flat_rows = idx.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat_rows)
    rows = flat_rows[order]
    tokens = (order // J).astype(jnp.int32) * W  # the d_out row of each pick: b*W + block
    if grouped:
        tokens += blk.reshape(-1).astype(jnp.int32)[order]
    wts = w.reshape(-1).astype(jnp.float32)[order]
    dout_rows = dout.reshape(B * W, 1, D)
    d_table = jnp.zeros((M, 1, D), jnp.float32)
    for s in range(0, rows.shape[0], bs.entries_per_call):
        rc, tc, wc = (x[s : s + bs.entries_per_call] for x in (rows, tokens, wts))
        row_spec = pl.BlockSpec((None, 1, D), lambda e, rows_, *_: (rows_[e], 0, 0))
        d_table = pl.pallas_call(
            _scatter_tpu_kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3,
                grid=(rc.shape[0],),
                in_specs=[row_spec, pl.BlockSpec((None, 1, D), lambda e, rows_, tok, *_: (tok[e], 0, 0))],
                out_specs=row_spec,
            ),
            out_shape=jax.ShapeDtypeStruct((M, 1, D), jnp.float32),
            input_output_aliases={3: 0},  # rows no pick touches keep their zeros
            compiler_params=common.compiler_params("tpu", interpret, semantics=("arbitrary",)),
            interpret=interpret,
            name="memory_lookup_scatter",
        )(rc, tc, wc, d_table, dout_rows)
    return d_table[:, 0], d_weights


# ----------------------------------------------------------------------------------------------
# GPU (Triton)


def _gather_gpu_kernel(idx_ref, w_ref, blk_ref, table_ref, out_ref, *, bb, bd, J, W):
    b0, d0 = pl.program_id(0) * bb, pl.program_id(1) * bd

    def body(j, accs):
        rows = idx_ref[pl.ds(b0, bb), j]  # [bb]
        w = w_ref[pl.ds(b0, bb), j].astype(jnp.float32)
        picked = w[:, None] * table_ref[rows, pl.ds(d0, bd)].astype(jnp.float32)  # [bb,bd]
        if blk_ref is None:
            return (accs[0] + picked,)
        blk = blk_ref[pl.ds(b0, bb), j]
        return tuple(acc + jnp.where((blk == v)[:, None], picked, 0.0) for v, acc in enumerate(accs))

    accs = lax.fori_loop(0, J, body, (jnp.zeros((bb, bd), jnp.float32),) * W)
    for v, acc in enumerate(accs):
        out_ref[:, v, :] = acc


def _backward_gpu_kernel(
    idx_ref, w_ref, blk_ref, table_ref, dout_ref, d_table_in, dw_ref, d_table_ref, *, bb, bd, J
):
    del d_table_in  # aliased with d_table_ref: the zeros the atomics add into
    b0, d0 = pl.program_id(0) * bb, pl.program_id(1) * bd
    cols = pl.ds(d0, bd)

    def body(e, carry):
        b = b0 + common.div(e, J)
        j = lax.rem(e, J)
        row, w = idx_ref[b, j], w_ref[b, j].astype(jnp.float32)
        v = 0 if blk_ref is None else blk_ref[b, j]
        dout = dout_ref[b, v, cols].astype(jnp.float32)  # [bd]
        dw_ref[b, j] = jnp.sum(table_ref[row, cols].astype(jnp.float32) * dout)
        pltriton.atomic_add(d_table_ref, (row, cols), w * dout)
        return carry

    lax.fori_loop(0, bb * J, body, 0)


def _gpu_inputs(bs, interpret, idx, w, blk, D, *extra):
    B = idx.shape[0]
    bb, bd = _block_b(bs, B, "gpu", interpret), _block_d(bs, D, "gpu", interpret)
    Bp = common.round_up(B, bb)
    padded = [None if x is None else common.pad_axis(x, 0, Bp) for x in (idx, w, blk, *extra)]
    return bb, bd, Bp, padded  # pads: row 0, weight 0, block 0


def _whole(x):
    return None if x is None else pl.BlockSpec(x.shape, lambda i, d, nd=x.ndim: (0,) * nd)


def _gpu_gather(bs, interpret, table, idx, w, blk, W):
    B, J = idx.shape
    D = table.shape[1]
    bb, bd, Bp, (idx_p, w_p, blk_p) = _gpu_inputs(bs, interpret, idx, w, blk, D)
    out = pl.pallas_call(
        functools.partial(_gather_gpu_kernel, bb=bb, bd=bd, J=J, W=W),
        grid=(Bp // bb, D // bd),
        in_specs=[_whole(idx_p), _whole(w_p), _whole(blk_p), _whole(table)],
        out_specs=pl.BlockSpec((bb, W, bd), lambda i, d: (i, 0, d)),
        out_shape=jax.ShapeDtypeStruct((Bp, W, D), jnp.float32),
        compiler_params=common.compiler_params(
            "gpu", interpret, num_warps=bs.num_warps, num_stages=bs.num_stages
        ),
        interpret=interpret,
        name="memory_lookup_fwd",
    )(idx_p, w_p, blk_p, table)
    return out[:B]


def _gpu_backward(bs, interpret, table, idx, w, blk, W, dout):
    B, J = idx.shape
    M, D = table.shape
    bb, bd, Bp, (idx_p, w_p, blk_p, dout_p) = _gpu_inputs(bs, interpret, idx, w, blk, D, dout)
    zeros = jnp.zeros((M, D), jnp.float32)
    dw, d_table = pl.pallas_call(
        functools.partial(_backward_gpu_kernel, bb=bb, bd=bd, J=J),
        grid=(Bp // bb, D // bd),
        in_specs=[_whole(idx_p), _whole(w_p), _whole(blk_p), _whole(table), _whole(dout_p), _whole(zeros)],
        out_specs=[pl.BlockSpec((None, Bp, J), lambda i, d: (d, 0, 0)), _whole(zeros)],
        out_shape=[
            jax.ShapeDtypeStruct((D // bd, Bp, J), jnp.float32),
            jax.ShapeDtypeStruct((M, D), jnp.float32),
        ],
        input_output_aliases={4 + (blk_p is not None): 1},  # zeros: the 6th input, or 5th
        compiler_params=common.compiler_params(
            "gpu", interpret, num_warps=bs.num_warps, num_stages=bs.num_stages
        ),
        interpret=interpret,
        name="memory_lookup_bwd",
    )(idx_p, w_p, blk_p, table, dout_p, zeros)
    return d_table, jnp.sum(dw, axis=0)[:B]  # d weights: partial dots of each column block


# ----------------------------------------------------------------------------------------------
# Public wrappers


def _forward_call(st, target, interpret, table, idx, w, blk):
    bs = st.block_sizes or BlockSizes.default(target)
    if target == "tpu":
        return _tpu_gather(bs, interpret, table[:, None, :], idx, w, blk, st.num_blocks)
    return _gpu_gather(bs, interpret, table, idx, w, blk, st.num_blocks)


def _backward_call(st, target, interpret, table, idx, w, blk, dout):
    bs = st.block_sizes or BlockSizes.default(target)
    if target == "tpu":
        return _tpu_backward(bs, interpret, table[:, None, :], idx, w, blk, st.num_blocks, dout)
    return _gpu_backward(bs, interpret, table, idx, w, blk, st.num_blocks, dout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lookup(st, table, indices, weights, blocks):
    """``[B,W,D]`` in ``table``'s dtype."""

    def build(target, interpret):
        return functools.partial(_forward_call, st, target, interpret)

    out = common.dispatch(build, table, indices, weights, blocks, interpret=st.interpret)
    return out.astype(table.dtype)


def _lookup_fwd(st, table, indices, weights, blocks):
    return _lookup(st, table, indices, weights, blocks), (table, indices, weights, blocks)


def _lookup_bwd(st, res, d_out):
    table, indices, weights, blocks = res

    def build(target, interpret):
        return functools.partial(_backward_call, st, target, interpret)

    d_table, d_weights = common.dispatch(
        build, table, indices, weights, blocks, d_out, interpret=st.interpret
    )
    return d_table.astype(table.dtype), None, d_weights.astype(weights.dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def _check(table, indices, weights, blocks, num_blocks, block_sizes):
    common.check_rank("table", table, 2, "[M,D]")
    common.check_rank("indices", indices, 2, "[B,J]")
    common.check_rank("weights", weights, 2, "[B,J]")
    common.check_dtype("indices", indices, (jnp.integer,))
    common.check_dtype("weights", weights, (jnp.floating,))
    common.check_dtype("table", table, (jnp.floating,))
    if indices.shape != weights.shape:
        raise ValueError(
            f"indices has shape {indices.shape} but weights {weights.shape}: they must match [B,J]"
        )
    if 0 in indices.shape or 0 in table.shape:
        raise ValueError(f"indices {indices.shape} and table {table.shape} must be non-empty")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes={block_sizes!r} must be a memory_lookup.BlockSizes")
    if block_sizes is not None:
        _block_d(block_sizes, table.shape[1], "gpu", interpret=True)  # divides D, whatever target
    if common.is_concrete(indices):
        host = np.asarray(indices)
        if host.min() < 0 or host.max() >= table.shape[0]:
            raise ValueError(
                f"indices span [{host.min()}, {host.max()}]: the table has "
                f"{table.shape[0]} rows, so [0, {table.shape[0]}) is allowed"
            )
    if blocks is not None:
        if blocks.shape != indices.shape:
            raise ValueError(f"blocks has shape {blocks.shape} but indices {indices.shape}")
        common.check_dtype("blocks", blocks, (jnp.integer,))
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks!r} is invalid: must be a positive int")
        if common.is_concrete(blocks):
            host = np.asarray(blocks)
            if host.min() < 0 or host.max() >= num_blocks:
                raise ValueError(
                    f"blocks span [{host.min()}, {host.max()}]: num_blocks={num_blocks} "
                    f"allows [0, {num_blocks})"
                )


def memory_lookup(
    table: jax.Array,
    indices: jax.Array,
    weights: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``Σ_j weights[b,j] · table[indices[b,j]]``; differentiable in ``table`` and ``weights``.

    Args:
      table: ``[M,D]`` value rows.
      indices: int ``[B,J]`` rows in ``[0, M)`` (checked when concrete).
      weights: float ``[B,J]``.
      block_sizes: ``BlockSizes``; default per target.
      interpret: run with the Pallas interpreter.
    Returns:
      ``[B,D]`` in ``table``'s dtype (float32 accumulation).
    """
    _check(table, indices, weights, None, 1, block_sizes)
    st = _Static(block_sizes, bool(interpret), 1)
    return _lookup(st, table, indices.astype(jnp.int32), weights, None)[:, 0]


def memory_lookup_grouped(
    table: jax.Array,
    indices: jax.Array,
    weights: jax.Array,
    blocks: jax.Array,
    num_blocks: int,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``[B,W,D]``: ``out[b,w] = Σ_{j: blocks[b,j]=w} weights[b,j] · table[indices[b,j]]``.

    UltraMem's implicit value expansion pools the picks of each virtual block apart; W =
    ``num_blocks`` (small). Same kernels as ``memory_lookup``, each pick adding into its block.

    Args:
      table, indices, weights: as ``memory_lookup``.
      blocks: int ``[B,J]`` in ``[0, num_blocks)``: the output block of each pick.
      num_blocks: W.
    Returns:
      ``[B,W,D]`` in ``table``'s dtype (float32 accumulation).
    """
    _check(table, indices, weights, blocks, num_blocks, block_sizes)
    st = _Static(block_sizes, bool(interpret), int(num_blocks))
    return _lookup(st, table, indices.astype(jnp.int32), weights, blocks.astype(jnp.int32))


def memory_lookup_grouped_reference(table, indices, weights, blocks, num_blocks: int) -> jax.Array:
    """``[B,W,D]``: the picks' weighted sum per block (float32 sum, ``table``'s dtype)."""
    rows = table[indices].astype(jnp.float32)  # [B,J,D]
    onehot = jax.nn.one_hot(blocks, num_blocks, dtype=jnp.float32)  # [B,J,W]
    out = jnp.einsum("BJ,BJW,BJD->BWD", weights.astype(jnp.float32), onehot, rows)
    return out.astype(table.dtype)
