"""Grouped matmul for dropless mixture of experts: ``gmm`` and its transpose ``tgmm``.

Tokens are sorted by expert, so the rows of ``lhs [M,K]`` form E consecutive groups of
``group_sizes [E]`` rows (any size, empty included; rows past ``sum(group_sizes)`` belong to
no group). ``gmm`` multiplies each group by its own matrix, ``out[rows of e] = lhs[rows of
e] @ rhs[e]`` with ``rhs [E,K,N]``; ``tgmm`` is the weight gradient, ``out[e] = lhs[rows of
e]ᵀ @ grad[rows of e]`` of shape ``[E,K,N]``. In an MoE layer K and N are D and F (up and
gate projections) or F and D (down projection); M is the number of routed token copies.

The row tiles of the problem are enumerated as *work items*: (group, tile) pairs, one for
every tile a group touches, so a tile shared by two groups is computed twice with each
group's weights and each result stored only in its group's rows (the technique of
megablox, arXiv 2211.15841). There are at most ``M/bm + E - 1`` items.

On TPU the items are a grid axis whose index maps read the item list (scalar prefetch), and
consecutive items that share an output tile keep it resident; on GPU (Triton, which has no
scalar prefetch) each program reads its item and loads its tiles by pointer offsets, storing
with a row mask. ``gmm`` has a ``custom_vjp``: ``d lhs = gmm(d out, rhs, transposed)``,
``d rhs = tgmm(lhs, d out)``.
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


def group_ids_of_rows(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """``[M]`` int32: the group of each row; ``E`` for rows past ``sum(group_sizes)``."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(num_rows), side="right").astype(jnp.int32)


def gmm_reference(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False
) -> jax.Array:
    """``[M,N]``: row ``m`` of group ``e`` is ``lhs[m] @ rhs[e]`` (``rhs[e]ᵀ`` if transposed);
    rows in no group are zero. ``rhs`` is ``[E,K,N]`` (``[E,N,K]`` if transposed)."""
    E = rhs.shape[0]
    rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs  # [E,K,N]
    one_hot = group_ids_of_rows(group_sizes, lhs.shape[0])[:, None] == jnp.arange(E)  # [M,E]
    per_group = jnp.einsum("MK,EKN->EMN", lhs, rhs, preferred_element_type=jnp.float32)
    out = jnp.einsum("ME,EMN->MN", one_hot.astype(jnp.float32), per_group)
    return out.astype(lhs.dtype)


def gmm_xla(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False
) -> jax.Array:
    """``gmm_reference`` by ``jax.lax.ragged_dot``: what ``llmarch.ops`` runs for ``impl="xla"``
    (no ``[E,M,N]`` intermediate; differentiable, and it runs on CPU)."""
    rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    return jax.lax.ragged_dot(
        lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32
    ).astype(lhs.dtype)


def tgmm_reference(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``[E,K,N]``: ``lhs[rows of e]ᵀ @ grad[rows of e]``; zero for an empty group."""
    E = group_sizes.shape[0]
    one_hot = group_ids_of_rows(group_sizes, lhs.shape[0])[:, None] == jnp.arange(E)  # [M,E]
    out = jnp.einsum(
        "ME,MK,MN->EKN", one_hot.astype(jnp.float32), lhs.astype(jnp.float32), grad.astype(jnp.float32)
    )
    return out.astype(lhs.dtype)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles: ``block_m`` rows, ``block_k`` contraction, ``block_n`` output columns.

    M, K and N need not be multiples (the wrapper pads). On TPU ``block_m`` must be a
    multiple of 8 and ``block_k``, ``block_n`` of 128; on GPU all are powers of two >= 16.
    """

    block_m: int = 128
    block_k: int = 128
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        common.check_positive(
            "BlockSizes",
            block_m=self.block_m,
            block_k=self.block_k,
            block_n=self.block_n,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )

    @classmethod
    def default(cls, target: str) -> BlockSizes:
        if target == "tpu":
            return cls(block_m=256, block_k=512, block_n=512)
        return cls(block_m=64, block_k=64, block_n=128, num_warps=4, num_stages=3)


@dataclasses.dataclass(frozen=True)
class _Static:
    transpose_rhs: bool
    block_sizes: BlockSizes | None
    interpret: bool


def _tiles(bs: BlockSizes | None, target, interpret, M, K, N):
    bs = bs or BlockSizes.default(target)
    fit = functools.partial(common.fit_block, "BlockSizes", target=target, interpret=interpret, min_gpu=16)
    return (
        fit("block_m", bs.block_m, M),
        fit("block_k", bs.block_k, K, lane=True),
        fit("block_n", bs.block_n, N, lane=True),
        bs,
    )


def _work_items(group_sizes, num_tiles: int, bm: int):
    """The (group, row tile) pairs to compute, in row order, padded to the static bound.

    Returns ``group_ids, tile_ids [num_tiles + E - 1]``, ``starts, ends [E]`` (each group's
    rows) and ``num_valid [1]``. Padding items repeat the last valid one (so on TPU they map
    to a resident tile and cost no copy) and are skipped by the kernels.
    """
    E = group_sizes.shape[0]
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(gs)
    starts = ends - gs
    first = starts // bm
    tiles = jnp.where(gs > 0, common.cdiv(ends, bm) - first, 0)
    cum = jnp.cumsum(tiles)
    num_valid = cum[-1]
    w = jnp.arange(num_tiles + E - 1, dtype=jnp.int32)
    w = jnp.minimum(w, jnp.maximum(num_valid - 1, 0))  # padding items repeat the last valid one
    group = jnp.minimum(jnp.searchsorted(cum, w, side="right"), E - 1).astype(jnp.int32)
    tile = first[group] + w - (cum[group] - tiles[group])
    tile = jnp.clip(tile, 0, num_tiles - 1).astype(jnp.int32)
    return group, tile, starts, ends, num_valid.reshape(1)


def _row_mask(tile, start, end, bm):
    rows = tile * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    return (rows >= start) & (rows < end)  # [bm,1]


def _dot(a, b, transpose_b):
    dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """``a[m,k]ᵀ · b[m,n] -> [k,n]`` in float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------
# gmm


def _gmm_tpu_kernel(
    gid_ref, tid_ref, start_ref, end_ref, nvalid_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, bm, transpose_rhs
):
    w, kk = pl.program_id(1), pl.program_id(2)
    valid = w < nvalid_ref[0]

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(valid)
    def _():
        acc_ref[...] += _dot(lhs_ref[...], rhs_ref[...], transpose_rhs)

    @pl.when(valid & (kk == pl.num_programs(2) - 1))
    def _():
        g = gid_ref[w]
        mask = _row_mask(tid_ref[w], start_ref[g], end_ref[g], bm)
        # The tile stays resident across items that share it: keep the other groups' rows.
        out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def _gmm_gpu_kernel(
    gid_ref,
    tid_ref,
    start_ref,
    end_ref,
    nvalid_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    *,
    bm,
    bk,
    bn,
    k_steps,
    transpose_rhs,
):
    w, n = pl.program_id(0), pl.program_id(1)

    @pl.when(w < nvalid_ref[0])
    def _():
        g, t = gid_ref[w], tid_ref[w]
        rows, cols = pl.ds(t * bm, bm), pl.ds(n * bn, bn)

        def body(kk, acc):
            ks = pl.ds(kk * bk, bk)
            b = rhs_ref[g, cols, ks] if transpose_rhs else rhs_ref[g, ks, cols]
            return acc + _dot(lhs_ref[rows, ks], b, transpose_rhs)

        acc = lax.fori_loop(0, k_steps, body, jnp.zeros((bm, bn), jnp.float32))
        mask = jnp.broadcast_to(_row_mask(t, start_ref[g], end_ref[g], bm), (bm, bn))
        pltriton.store(out_ref.at[rows, cols], acc.astype(out_ref.dtype), mask=mask)


def _gmm_call(st: _Static, target, interpret, lhs, rhs, group_sizes, out_dtype):
    M, K = lhs.shape
    N = rhs.shape[1] if st.transpose_rhs else rhs.shape[2]
    bm, bk, bn, bs = _tiles(st.block_sizes, target, interpret, M, K, N)
    Mp, Kp, Np = common.round_up(M, bm), common.round_up(K, bk), common.round_up(N, bn)
    lhs_p = common.pad_axis(common.pad_axis(lhs, 0, Mp), 1, Kp)
    rhs_p = (
        common.pad_axis(common.pad_axis(rhs, 1, Np), 2, Kp)
        if st.transpose_rhs
        else common.pad_axis(common.pad_axis(rhs, 1, Kp), 2, Np)
    )
    gid, tid, starts, ends, nvalid = _work_items(group_sizes, Mp // bm, bm)
    num_work = gid.shape[0]
    out_shape = jax.ShapeDtypeStruct((Mp, Np), out_dtype)
    if target == "tpu":
        rhs_spec = (
            pl.BlockSpec((None, bn, bk), lambda n, w, k, g, t, *_: (g[w], n, k))
            if st.transpose_rhs
            else pl.BlockSpec((None, bk, bn), lambda n, w, k, g, t, *_: (g[w], k, n))
        )
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(Np // bn, num_work, Kp // bk),
            in_specs=[pl.BlockSpec((bm, bk), lambda n, w, k, g, t, *_: (t[w], k)), rhs_spec],
            out_specs=pl.BlockSpec((bm, bn), lambda n, w, k, g, t, *_: (t[w], n)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        )
        out = pl.pallas_call(
            functools.partial(_gmm_tpu_kernel, bm=bm, transpose_rhs=st.transpose_rhs),
            grid_spec=grid_spec,
            out_shape=out_shape,
            compiler_params=common.compiler_params(
                target, interpret, semantics=("parallel", "arbitrary", "arbitrary")
            ),
            interpret=interpret,
            name="gmm",
        )(gid, tid, starts, ends, nvalid, lhs_p, rhs_p)
    else:
        whole = [
            pl.BlockSpec(x.shape, lambda w, n, nd=x.ndim: (0,) * nd)
            for x in (gid, tid, starts, ends, nvalid, lhs_p, rhs_p)
        ]
        out = pl.pallas_call(
            functools.partial(
                _gmm_gpu_kernel, bm=bm, bk=bk, bn=bn, k_steps=Kp // bk, transpose_rhs=st.transpose_rhs
            ),
            grid=(num_work, Np // bn),
            in_specs=whole,
            out_specs=pl.BlockSpec((Mp, Np), lambda w, n: (0, 0)),
            out_shape=out_shape,
            compiler_params=common.compiler_params(
                target, interpret, num_warps=bs.num_warps, num_stages=bs.num_stages
            ),
            interpret=interpret,
            name="gmm",
        )(gid, tid, starts, ends, nvalid, lhs_p, rhs_p)
    # Rows in no group (and tiles no item visited) are zero by definition.
    in_group = jnp.arange(M) < jnp.sum(group_sizes)
    return jnp.where(in_group[:, None], out[:M, :N], 0).astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# tgmm


def _tgmm_tpu_kernel(
    gid_ref, tid_ref, start_ref, end_ref, nvalid_ref, lhs_ref, grad_ref, out_ref, acc_ref, *, bm
):
    w = pl.program_id(2)
    last_w = pl.num_programs(2) - 1
    nvalid = nvalid_ref[0]
    g = gid_ref[w]
    first = (w == 0) | (gid_ref[jnp.maximum(w - 1, 0)] != g)
    last = (w == nvalid - 1) | (gid_ref[jnp.minimum(w + 1, last_w)] != g)
    valid = w < nvalid

    @pl.when(valid & first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(valid)
    def _():
        mask = _row_mask(tid_ref[w], start_ref[g], end_ref[g], bm)
        lhs = jnp.where(mask, lhs_ref[...], 0).astype(lhs_ref.dtype)
        acc_ref[...] += _dot_tn(lhs, grad_ref[...])

    @pl.when(valid & last)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tgmm_gpu_kernel(start_ref, end_ref, lhs_ref, grad_ref, out_ref, *, bm, bk, bn):
    g, kk, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = start_ref[g], end_ref[g]

    def body(t, acc):
        rows = pl.ds(t * bm, bm)
        lhs = lhs_ref[rows, pl.ds(kk * bk, bk)]
        lhs = jnp.where(_row_mask(t, start, end, bm), lhs, 0).astype(lhs.dtype)
        return acc + _dot_tn(lhs, grad_ref[rows, pl.ds(n * bn, bn)])

    t_end = jnp.where(end > start, common.div(end + bm - 1, bm), 0)
    acc = lax.fori_loop(common.div(start, bm), t_end, body, jnp.zeros((bk, bn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _tgmm_call(st: _Static, target, interpret, lhs, grad, group_sizes, out_dtype):
    M, K = lhs.shape
    N = grad.shape[1]
    E = group_sizes.shape[0]
    bm, bk, bn, bs = _tiles(st.block_sizes, target, interpret, M, K, N)
    Mp, Kp, Np = common.round_up(M, bm), common.round_up(K, bk), common.round_up(N, bn)
    lhs_p = common.pad_axis(common.pad_axis(lhs, 0, Mp), 1, Kp)
    grad_p = common.pad_axis(common.pad_axis(grad, 0, Mp), 1, Np)
    gid, tid, starts, ends, nvalid = _work_items(group_sizes, Mp // bm, bm)
    out_shape = jax.ShapeDtypeStruct((E, Kp, Np), out_dtype)
    if target == "tpu":
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(Kp // bk, Np // bn, gid.shape[0]),
            in_specs=[
                pl.BlockSpec((bm, bk), lambda k, n, w, g, t, *_: (t[w], k)),
                pl.BlockSpec((bm, bn), lambda k, n, w, g, t, *_: (t[w], n)),
            ],
            out_specs=pl.BlockSpec((None, bk, bn), lambda k, n, w, g, t, *_: (g[w], k, n)),
            scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
        )
        out = pl.pallas_call(
            functools.partial(_tgmm_tpu_kernel, bm=bm),
            grid_spec=grid_spec,
            out_shape=out_shape,
            compiler_params=common.compiler_params(
                target, interpret, semantics=("parallel", "parallel", "arbitrary")
            ),
            interpret=interpret,
            name="tgmm",
        )(gid, tid, starts, ends, nvalid, lhs_p, grad_p)
    else:
        whole = [
            pl.BlockSpec(x.shape, lambda g, k, n, nd=x.ndim: (0,) * nd) for x in (starts, ends, lhs_p, grad_p)
        ]
        out = pl.pallas_call(
            functools.partial(_tgmm_gpu_kernel, bm=bm, bk=bk, bn=bn),
            grid=(E, Kp // bk, Np // bn),
            in_specs=whole,
            out_specs=pl.BlockSpec((None, bk, bn), lambda g, k, n: (g, k, n)),
            out_shape=out_shape,
            compiler_params=common.compiler_params(
                target, interpret, num_warps=bs.num_warps, num_stages=bs.num_stages
            ),
            interpret=interpret,
            name="tgmm",
        )(starts, ends, lhs_p, grad_p)
    # An empty group's matrix was never visited (TPU): its gradient is zero.
    return jnp.where((group_sizes > 0)[:, None, None], out[:, :K, :N], 0).astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# Public wrappers


def _run_gmm(st, lhs, rhs, group_sizes, out_dtype):
    def build(target, interpret):
        return lambda a, b, g: _gmm_call(st, target, interpret, a, b, g, out_dtype)

    return common.dispatch(build, lhs, rhs, group_sizes, interpret=st.interpret)


def _run_tgmm(st, lhs, grad, group_sizes, out_dtype):
    def build(target, interpret):
        return lambda a, b, g: _tgmm_call(st, target, interpret, a, b, g, out_dtype)

    return common.dispatch(build, lhs, grad, group_sizes, interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(st, lhs, rhs, group_sizes):
    return _run_gmm(st, lhs, rhs, group_sizes, lhs.dtype)


def _gmm_fwd(st, lhs, rhs, group_sizes):
    return _gmm(st, lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _gmm_bwd(st, res, d_out):
    lhs, rhs, group_sizes = res
    flipped = dataclasses.replace(st, transpose_rhs=not st.transpose_rhs)
    d_lhs = _run_gmm(flipped, d_out.astype(lhs.dtype), rhs, group_sizes, lhs.dtype)
    if st.transpose_rhs:  # out = lhs @ rhs[e]ᵀ: d rhs[e] = d_outᵀ @ lhs
        d_rhs = _run_tgmm(st, d_out.astype(lhs.dtype), lhs, group_sizes, rhs.dtype)
    else:
        d_rhs = _run_tgmm(st, lhs, d_out.astype(lhs.dtype), group_sizes, rhs.dtype)
    return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Grouped matmul ``[M,N]`` (see ``gmm_reference``); differentiable in ``lhs`` and ``rhs``.

    Args:
      lhs: ``[M,K]`` rows sorted by group.
      rhs: ``[E,K,N]``, or ``[E,N,K]`` with ``transpose_rhs=True``.
      group_sizes: int ``[E]``, non-negative, summing to at most M.
      block_sizes: tiles; default ``BlockSizes.default(target)``.
      interpret: run with the Pallas interpreter (any backend).
    Returns:
      ``[M,N]`` in ``lhs``'s dtype (``rhs`` is cast to it; float32 accumulation); rows in no
      group are zero.
    """
    _check(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, block_sizes=block_sizes)
    return _gmm(
        _Static(bool(transpose_rhs), block_sizes, bool(interpret)),
        lhs,
        rhs.astype(lhs.dtype),
        group_sizes.astype(jnp.int32),
    )


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``[E,K,N]``: per group ``lhs[rows]ᵀ @ grad[rows]`` (see ``tgmm_reference``).

    Args:
      lhs: ``[M,K]``; grad: ``[M,N]``; rows sorted by group as for ``gmm``.
      group_sizes: int ``[E]``.
    Returns:
      ``[E,K,N]`` in ``lhs``'s dtype; zero for empty groups.
    """
    common.check_rank("grad", grad, 2, "[M,N]")
    if grad.shape[0] != np.shape(lhs)[0]:
        raise ValueError(f"grad has {grad.shape[0]} rows but lhs has {np.shape(lhs)[0]}")
    _check(lhs, None, group_sizes, transpose_rhs=False, block_sizes=block_sizes)
    return _run_tgmm(
        _Static(False, block_sizes, bool(interpret)),
        lhs,
        grad.astype(lhs.dtype),
        group_sizes.astype(jnp.int32),
        lhs.dtype,
    )


def _check(lhs, rhs, group_sizes, *, transpose_rhs, block_sizes):
    common.check_rank("lhs", lhs, 2, "[M,K]")
    common.check_rank("group_sizes", group_sizes, 1, "[E]")
    common.check_dtype("group_sizes", group_sizes, (jnp.integer,))
    M, K = lhs.shape
    E = group_sizes.shape[0]
    if E == 0:
        raise ValueError("group_sizes has shape (0,): at least one group is needed")
    if rhs is not None:
        common.check_rank("rhs", rhs, 3, "[E,N,K]" if transpose_rhs else "[E,K,N]")
        if rhs.shape[0] != E:
            raise ValueError(f"rhs has {rhs.shape[0]} groups but group_sizes has {E}")
        rk = rhs.shape[2] if transpose_rhs else rhs.shape[1]
        if rk != K:
            axis = "rhs.shape[2]" if transpose_rhs else "rhs.shape[1]"
            raise ValueError(f"{axis}={rk} does not match lhs's contraction dim K={K}")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes={block_sizes!r} must be a grouped_matmul.BlockSizes")
    if common.is_concrete(group_sizes):
        host = np.asarray(group_sizes)
        if host.min() < 0:
            raise ValueError(f"group_sizes has a negative entry ({host.min()}): sizes are >= 0")
        if host.sum() > M:
            raise ValueError(f"group_sizes sums to {host.sum()}, more than lhs's {M} rows")
