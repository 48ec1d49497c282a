"""Fused LM-head cross entropy: the loss of ``z = x·Wᵀ`` without ever holding ``z`` whole.

A language model's loss needs, per token b, the log normalizer ``lse_b = logsumexp_v z_bv`` and
the target logit ``z_b,y_b`` of the logits ``z [B,V]`` (``x [B,D]``: final hidden states, B the
flattened batch × sequence; ``W [V,D]``: the output embedding). Materialized, ``z`` is float32
``[B,V]``: 2.1 GB for 4,096 tokens of Llama 3's 128,256-entry vocabulary, more than the model's
own weights at small widths, and the plain loss keeps several such buffers alive at once (the
logits, their softmax, the gradient). Here ``z`` exists one ``[block_b, block_v]`` tile at a time,
as in Cut Cross-Entropy (Wijmans et al., arXiv 2411.09009).

The op returns per-token ``(nll, lse)``, both differentiable, so the caller masks, averages and
adds PaLM's z-loss ``mean(lse²)`` in plain jnp. Backward, with cotangents ``g_nll, g_lse``,
``dz = (g_nll + g_lse)·softmax(z) − g_nll·onehot(y)`` is recomputed tile by tile from the saved
``lse``; ``dx = dz·W`` and ``dW = dzᵀ·x``.

Kernels. Forward (both targets): a fully parallel grid over (token tile, vocabulary tile); each
program writes its tile's log-sum-exp and its share of the target logit, and XLA combines the
``[V/block_v, B]`` partials. Backward on TPU: a ``dx`` kernel (grid token × vocabulary tiles, the
vocabulary axis sequential, the ``dx`` tile resident in VMEM) and a ``dW`` kernel (vocabulary ×
token tiles, the transposed problem, so every matmul is ``a·b`` or ``a·bᵀ``). Backward on GPU
(Triton, whose grid has no sequential axis): one kernel per (token tile, vocabulary tile) that
adds its ``dx`` and ``dW`` parts with float32 atomics, ``block_d`` columns at a time (so
summation order, hence the last bits, vary from run to run). The kernels read ``W`` as vocabulary
rows ``[V,D]``; an LM head stored ``[D,V]`` (``transpose_w=True``) is transposed on the way in
and its gradient on the way out (one weight-sized copy each).

``cross_entropy_xla`` (``_cross_entropy_xla``) is the XLA path, a loop over vocabulary chunks;
``cross_entropy_reference`` is the specification, which materializes ``z``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas import _common as common
from kernels_pallas._cross_entropy_xla import DEFAULT_CHUNK, chunked_cross_entropy

__all__ = [
    "DEFAULT_CHUNK",
    "BlockSizes",
    "cross_entropy",
    "cross_entropy_reference",
    "cross_entropy_xla",
]


def cross_entropy_reference(
    x: jax.Array, w: jax.Array, labels: jax.Array, *, transpose_w: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``(nll [B], lse [B])`` float32 of the logits ``z = x·Wᵀ``: ``lse = logsumexp(z)`` and
    ``nll = lse − z[y]``, with ``x [B,D]``, ``w [V,D]`` (``[D,V]`` with ``transpose_w``) cast to
    ``x``'s dtype, float32 accumulation. Materializes ``z [B,V]``."""
    w = (w.T if transpose_w else w).astype(x.dtype)  # [V,D]
    z = jnp.einsum("BD,VD->BV", x, w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    target = jnp.take_along_axis(z, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]
    return lse - target, lse


def cross_entropy_xla(
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    transpose_w: bool = False,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[jax.Array, jax.Array]:
    """``cross_entropy_reference``'s function (up to float rounding) computed ``chunk``
    vocabulary entries at a time (``_cross_entropy_xla``): what ``llmarch.ops`` runs on CPU.
    A vocabulary of at most ``chunk`` entries takes the plain formula (one chunk is the whole
    logits anyway)."""
    _check(x, w, labels, transpose_w, None)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk={chunk!r} is invalid: must be a positive int (vocabulary entries per step)")
    labels = labels.astype(jnp.int32)
    if chunk >= w.shape[1 if transpose_w else 0]:
        return cross_entropy_reference(x, w, labels, transpose_w=transpose_w)
    return chunked_cross_entropy(x, w.astype(x.dtype), labels, bool(transpose_w), chunk)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the cross-entropy kernels.

    Attributes:
      block_b: tokens per tile.
      block_v: vocabulary entries per tile.
      block_d: GPU only: model-width columns per step of the tiles' dot loops and atomic adds
        (TPU multiplies whole rows: a ``[block, D]`` tile of ``x`` and of ``W`` sit in VMEM).
      num_warps, num_stages: GPU only.
      vmem_limit_bytes: TPU only: scoped VMEM; raise it for very wide models (the tiles take
        about ``2·(block_b + block_v)·D·itemsize`` bytes, double-buffered, plus the f32 output).

    A block larger than its axis shrinks to it; axes that are not a multiple are padded (zero
    rows and columns, masked). On TPU ``block_b`` and ``block_v`` must be multiples of 128 (each
    is the minor dim of a logits tile); on GPU every block is a power of two >= 16.
    """

    block_b: int = 256
    block_v: int = 512
    block_d: int = 64
    num_warps: int = 4
    num_stages: int = 2
    vmem_limit_bytes: int | None = None

    def __post_init__(self):
        common.check_positive("BlockSizes", **dataclasses.asdict(self))

    @classmethod
    def default(cls, target: str) -> BlockSizes:
        if target == "tpu":
            return cls(block_b=256, block_v=512)
        return cls(block_b=64, block_v=128, block_d=64)


def _dot_nt(a, b):
    """``a [m,k] · b[n,k]ᵀ -> [m,n]`` in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    """``a [m,k] · b[k,n] -> [m,n]`` in float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """``a [k,m]ᵀ · b[k,n] -> [m,n]`` in float32 (GPU only: Triton transposes freely)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _logits(x_ref, w_ref, bd):
    """``[bb,bv]`` float32 logits of the tiles ``x [bb,D]``, ``w [bv,D]``: one dot (``bd`` None),
    or ``bd`` columns per step (Triton loads each ``[rows, bd]`` slice into registers)."""
    if bd is None:
        return _dot_nt(x_ref[...], w_ref[...])

    def body(k, acc):
        cols = pl.ds(pl.multiple_of(k * bd, bd), bd)
        return acc + _dot_nt(x_ref[:, cols], w_ref[:, cols])

    init = jnp.zeros((x_ref.shape[0], w_ref.shape[0]), jnp.float32)
    return lax.fori_loop(0, x_ref.shape[1] // bd, body, init)


def _dlogits(z, vocab_ids, labels, lse, g_nll, g_tot, vocab):
    """``d loss / d z`` of a tile: ``g_tot·softmax(z) − g_nll·onehot(y)``, zero on padded
    vocabulary entries (their ``exp(0 − lse)`` could overflow). The per-token arguments broadcast
    against ``z`` (columns ``[bb,1]`` for ``z [bb,bv]``, rows ``[1,bb]`` for ``zᵀ``)."""
    dz = g_tot * jnp.exp(z - lse) - jnp.where(vocab_ids == labels, g_nll, 0.0)
    return dz if vocab is None else jnp.where(vocab_ids < vocab, dz, 0.0)


# ----------------------------------------------------------------------------------------------
# Kernels. Per-token inputs come as columns [bb,1] (tiles of z [bb,bv]) or rows [1,bb] (of zᵀ).


def _fwd_kernel(labels_ref, x_ref, w_ref, lse_ref, target_ref, *, vocab, bd):
    bv = w_ref.shape[0]
    z = _logits(x_ref, w_ref, bd)  # [bb,bv]
    vocab_ids = pl.program_id(1) * bv + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    if vocab is not None:
        z = jnp.where(vocab_ids < vocab, z, common.MASKED)  # every tile keeps >= 1 real entry
    m = jnp.max(z, axis=1, keepdims=True)
    lse_ref[...] = m + jnp.log(jnp.sum(jnp.exp(z - m), axis=1, keepdims=True))
    target_ref[...] = jnp.sum(jnp.where(vocab_ids == labels_ref[...], z, 0.0), axis=1, keepdims=True)


def _dx_tpu_kernel(labels_ref, lse_ref, gnll_ref, gtot_ref, x_ref, w_ref, dx_ref, *, vocab):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        dx_ref[...] = jnp.zeros_like(dx_ref)

    w = w_ref[...]
    bv = w.shape[0]
    vocab_ids = j * bv + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    z = _dot_nt(x_ref[...], w)  # [bb,bv]
    dz = _dlogits(z, vocab_ids, labels_ref[...], lse_ref[...], gnll_ref[...], gtot_ref[...], vocab)
    dx_ref[...] += _dot_nn(dz.astype(w.dtype), w)  # [bb,D]


def _dw_tpu_kernel(labels_ref, lse_ref, gnll_ref, gtot_ref, x_ref, w_ref, dw_ref, *, vocab):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _():
        dw_ref[...] = jnp.zeros_like(dw_ref)

    x = x_ref[...]
    bv = w_ref.shape[0]
    vocab_ids = j * bv + lax.broadcasted_iota(jnp.int32, (bv, 1), 0)
    z_t = _dot_nt(w_ref[...], x)  # [bv,bb]: the transposed tile, so dW is a plain a·b
    dz_t = _dlogits(z_t, vocab_ids, labels_ref[...], lse_ref[...], gnll_ref[...], gtot_ref[...], vocab)
    dw_ref[...] += _dot_nn(dz_t.astype(x.dtype), x)  # [bv,D]


def _bwd_gpu_kernel(
    labels_ref, lse_ref, gnll_ref, gtot_ref, x_ref, w_ref, dx_in, dw_in, dx_ref, dw_ref, *, vocab, bd
):
    del dx_in, dw_in  # aliased with dx_ref, dw_ref: the zeros the atomics add into
    i, j = pl.program_id(0), pl.program_id(1)
    bb, bv = x_ref.shape[0], w_ref.shape[0]
    vocab_ids = j * bv + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    z = _logits(x_ref, w_ref, bd)
    dz = _dlogits(z, vocab_ids, labels_ref[...], lse_ref[...], gnll_ref[...], gtot_ref[...], vocab)
    dz = dz.astype(x_ref.dtype)
    token_rows, vocab_rows = pl.ds(i * bb, bb), pl.ds(j * bv, bv)

    def body(k, carry):
        cols = pl.ds(pl.multiple_of(k * bd, bd), bd)
        pltriton.atomic_add(dx_ref, (token_rows, cols), _dot_nn(dz, w_ref[:, cols]))
        pltriton.atomic_add(dw_ref, (vocab_rows, cols), _dot_tn(dz, x_ref[:, cols]))
        return carry

    lax.fori_loop(0, x_ref.shape[1] // bd, body, 0)


# ----------------------------------------------------------------------------------------------
# pallas_call builders, per target.


@dataclasses.dataclass(frozen=True)
class _Static:
    transpose_w: bool
    block_sizes: BlockSizes | None
    interpret: bool


@dataclasses.dataclass(frozen=True)
class _Tiles:
    bb: int
    bv: int
    bd: int | None  # None: whole rows (TPU)
    B: int
    V: int
    D: int
    Bp: int
    Vp: int
    Dp: int


def _tiles(st, target, interpret, x, w) -> tuple[_Tiles, BlockSizes, jax.Array, jax.Array]:
    """The tiles for ``target`` and ``x [Bp,Dp]``, ``w [Vp,Dp]`` (vocabulary rows) zero-padded."""
    bs = st.block_sizes or BlockSizes.default(target)
    if st.transpose_w:
        w = w.T  # [D,V] -> [V,D]: the kernels read vocabulary rows
    (B, D), V = x.shape, w.shape[0]

    def fit(name, block, extent, lane):
        return common.fit_block("BlockSizes", name, block, extent, target, interpret, lane=lane, min_gpu=16)

    bb, bv = fit("block_b", bs.block_b, B, True), fit("block_v", bs.block_v, V, True)
    bd = None if target == "tpu" else fit("block_d", bs.block_d, D, False)
    Bp, Vp, Dp = common.round_up(B, bb), common.round_up(V, bv), D if bd is None else common.round_up(D, bd)
    x = common.pad_axis(common.pad_axis(x, 0, Bp), 1, Dp)
    w = common.pad_axis(common.pad_axis(w, 0, Vp), 1, Dp)
    return _Tiles(bb, bv, bd, B, V, D, Bp, Vp, Dp), bs, x, w


def _params(bs, target, interpret, semantics):
    return common.compiler_params(
        target,
        interpret,
        semantics=semantics,
        num_warps=bs.num_warps,
        num_stages=bs.num_stages,
        vmem_limit_bytes=bs.vmem_limit_bytes,
    )


def _per_token(t: _Tiles, values, *, rows: bool):
    """Per-token ``[B]`` vectors padded with zeros, as ``[B/bb, 1, bb]`` rows or ``[B/bb, bb, 1]``
    columns (whole minor dims, so any ``bb`` tiles them on TPU)."""
    shape = (t.Bp // t.bb, 1, t.bb) if rows else (t.Bp // t.bb, t.bb, 1)
    return [common.pad_axis(v, 0, t.Bp).reshape(shape) for v in values]


def _forward_call(st, target, interpret, x, w, labels):
    t, bs, x, w = _tiles(st, target, interpret, x, w)
    nv = t.Vp // t.bv
    column = pl.BlockSpec((None, t.bb, 1), lambda i, j: (i, 0, 0))
    partial_ = pl.BlockSpec((None, t.bb, 1), lambda i, j: (j, i, 0))  # of [V/bv, Bp, 1]
    lse, target_logit = pl.pallas_call(
        functools.partial(_fwd_kernel, vocab=t.V if t.Vp != t.V else None, bd=t.bd),
        grid=(t.Bp // t.bb, nv),
        in_specs=[
            column,
            pl.BlockSpec((t.bb, t.Dp), lambda i, j: (i, 0)),
            pl.BlockSpec((t.bv, t.Dp), lambda i, j: (j, 0)),
        ],
        out_specs=[partial_, partial_],
        out_shape=[jax.ShapeDtypeStruct((nv, t.Bp, 1), jnp.float32)] * 2,
        compiler_params=_params(bs, target, interpret, ("parallel", "parallel")),
        interpret=interpret,
        name="cross_entropy_fwd",
    )(*_per_token(t, [labels], rows=False), x, w)
    lse = jax.nn.logsumexp(lse[:, : t.B, 0], axis=0)  # over the vocabulary tiles
    return lse - jnp.sum(target_logit[:, : t.B, 0], axis=0), lse


def _backward_call(st, target, interpret, x, w, labels, lse, g_nll, g_tot):
    t, bs, x, w = _tiles(st, target, interpret, x, w)
    nb, nv = t.Bp // t.bb, t.Vp // t.bv
    vocab = t.V if t.Vp != t.V else None
    token_tile = lambda index: pl.BlockSpec((t.bb, t.Dp), index)  # noqa: E731
    vocab_tile = lambda index: pl.BlockSpec((t.bv, t.Dp), index)  # noqa: E731
    stats = (labels, lse, g_nll, g_tot)
    if target == "tpu":
        column = pl.BlockSpec((None, t.bb, 1), lambda i, j: (i, 0, 0))
        dx = pl.pallas_call(
            functools.partial(_dx_tpu_kernel, vocab=vocab),
            grid=(nb, nv),
            in_specs=[column] * 4 + [token_tile(lambda i, j: (i, 0)), vocab_tile(lambda i, j: (j, 0))],
            out_specs=token_tile(lambda i, j: (i, 0)),
            out_shape=jax.ShapeDtypeStruct((t.Bp, t.Dp), jnp.float32),
            compiler_params=_params(bs, target, interpret, ("parallel", "arbitrary")),
            interpret=interpret,
            name="cross_entropy_dx",
        )(*_per_token(t, stats, rows=False), x, w)
        row = pl.BlockSpec((None, 1, t.bb), lambda j, i: (i, 0, 0))
        dw = pl.pallas_call(
            functools.partial(_dw_tpu_kernel, vocab=vocab),
            grid=(nv, nb),
            in_specs=[row] * 4 + [token_tile(lambda j, i: (i, 0)), vocab_tile(lambda j, i: (j, 0))],
            out_specs=vocab_tile(lambda j, i: (j, 0)),
            out_shape=jax.ShapeDtypeStruct((t.Vp, t.Dp), jnp.float32),
            compiler_params=_params(bs, target, interpret, ("parallel", "arbitrary")),
            interpret=interpret,
            name="cross_entropy_dw",
        )(*_per_token(t, stats, rows=True), x, w)
    else:
        column = pl.BlockSpec((None, t.bb, 1), lambda i, j: (i, 0, 0))
        zeros = [jnp.zeros((t.Bp, t.Dp), jnp.float32), jnp.zeros((t.Vp, t.Dp), jnp.float32)]
        whole = [pl.BlockSpec(z.shape, lambda i, j: (0, 0)) for z in zeros]
        dx, dw = pl.pallas_call(
            functools.partial(_bwd_gpu_kernel, vocab=vocab, bd=t.bd),
            grid=(nb, nv),
            in_specs=[column] * 4
            + [token_tile(lambda i, j: (i, 0)), vocab_tile(lambda i, j: (j, 0)), *whole],
            out_specs=whole,
            out_shape=[jax.ShapeDtypeStruct(z.shape, jnp.float32) for z in zeros],
            input_output_aliases={6: 0, 7: 1},
            compiler_params=_params(bs, target, interpret, ("parallel", "parallel")),
            interpret=interpret,
            name="cross_entropy_bwd",
        )(*_per_token(t, stats, rows=False), x, w, *zeros)
    dw = dw[: t.V, : t.D]
    return dx[: t.B, : t.D], dw.T if st.transpose_w else dw


# ----------------------------------------------------------------------------------------------
# Public wrapper


def _forward(st, x, w, labels):
    def build(target, interpret):
        return functools.partial(_forward_call, st, target, interpret)

    return common.dispatch(build, x, w, labels, interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(st, x, w, labels):
    return _forward(st, x, w, labels)


def _fused_fwd(st, x, w, labels):
    nll, lse = _forward(st, x, w, labels)
    return (nll, lse), (x, w, labels, lse)


def _fused_bwd(st, res, cotangents):
    x, w, labels, lse = res
    g_nll, g_lse = (g.astype(jnp.float32) for g in cotangents)

    def build(target, interpret):
        return functools.partial(_backward_call, st, target, interpret)

    dx, dw = common.dispatch(build, x, w, labels, lse, g_nll, g_nll + g_lse, interpret=st.interpret)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def cross_entropy(
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    transpose_w: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``cross_entropy_reference`` computed by the Pallas kernels; differentiable in ``x``, ``w``.

    Args:
      x: ``[B,D]`` hidden states (B: tokens, any number).
      w: ``[V,D]`` output embedding (a tied embedding table), or ``[D,V]`` with ``transpose_w``
        (an LM head); cast to ``x``'s dtype, the dtype of the kernels' matmuls.
      labels: int ``[B]`` in ``[0, V)`` (checked when concrete).
      block_sizes: tiles; default ``BlockSizes.default(target)``.
      interpret: run the kernels with the Pallas interpreter (any backend, e.g. CPU).
    Returns:
      ``(nll [B], lse [B])`` float32: each token's ``logsumexp(z) − z[y]`` and ``logsumexp(z)``.
    Raises:
      ValueError, TypeError: mismatched shapes, bad dtypes or labels, block sizes that do not tile.
    """
    _check(x, w, labels, transpose_w, block_sizes)
    st = _Static(bool(transpose_w), block_sizes, bool(interpret))
    return _fused(st, x, w.astype(x.dtype), labels.astype(jnp.int32))


def _check(x, w, labels, transpose_w, block_sizes):
    common.check_rank("x", x, 2, "[B,D]")
    common.check_rank("w", w, 2, "[D,V]" if transpose_w else "[V,D]")
    common.check_rank("labels", labels, 1, "[B]")
    common.check_dtype("x", x, (jnp.floating,))
    common.check_dtype("w", w, (jnp.floating,))
    common.check_dtype("labels", labels, (jnp.integer,))
    D, V = w.shape if transpose_w else w.shape[::-1]
    if x.shape[1] != D:
        layout = "[D,V] (transpose_w=True)" if transpose_w else "[V,D]"
        raise ValueError(f"x has width {x.shape[1]} but w {w.shape} as {layout} has D={D}: they must match")
    if labels.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels has shape {labels.shape} but x has {x.shape[0]} tokens: expected ({x.shape[0]},)"
        )
    if 0 in x.shape or V == 0:
        raise ValueError(f"x {x.shape} and w {w.shape} must be non-empty")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes={block_sizes!r} must be a cross_entropy.BlockSizes")
    if common.is_concrete(labels):
        host = np.asarray(labels)
        if host.min() < 0 or host.max() >= V:
            raise ValueError(f"labels span [{host.min()}, {host.max()}]: the vocabulary allows [0, {V})")
