"""Flash attention: packed, causal, optionally windowed sequences with grouped KV heads.

``attention_reference`` is the specification (and ``llmarch.ops``' XLA implementation);
``flash_attention`` computes the same function with Pallas kernels that never hold a
``[T,S]`` score matrix: an online softmax over key blocks forward (FlashAttention-2,
arXiv 2307.08691), and two kernels backward, one for ``dq`` (looping over key blocks) and
one for ``dk, dv`` (looping over the query blocks of every query head of its KV group).

Masking compares *positions* and *segment ids*, not indices, so one kernel serves training
(packed documents), prefill and decoding against a cache. Key blocks that position and
segment bounds prove invisible to a whole query block (causal future, outside the window,
another document) are not computed, which halves the work of plain causal attention: on TPU a
branch skips them; on GPU the loop runs over the visible range only (``_tile_ranges``), as a
branch in the loop would stop Triton pipelining its loads.

Layout inside the kernels is heads-major, ``q [B,N,T,H]`` and ``k, v [B,K,S,H]``, so that
every tile's two minor dims are ``(rows, H)`` as Mosaic wants; the wrapper transposes. The
whole key sequence of one (batch, KV head) is one block (it stays resident while the grid
walks the query blocks; on GPU it is only a pointer), and the kernel loops over it in
``block_kv`` steps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import _common as common
from kernels_pallas import _tile_ranges
from kernels_pallas._flash_kernels import LSE_EMPTY, dkv_kernel, dq_kernel, fwd_kernel


def attention_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    causal: bool,
    sliding_window: int | None,
) -> jax.Array:
    """``[B,T,S]`` boolean: may query t attend to key s."""
    q = q_positions[:, :, None]  # [B,T,1]
    k = kv_positions[:, None, :]  # [B,1,S]
    mask = jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), dtype=bool)
    if causal:
        mask &= k <= q
    if sliding_window is not None:
        mask &= q - k < sliding_window
    if q_segment_ids is not None:
        mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return mask


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention of ``q [B,T,N,H]`` over ``k, v [B,S,K,H]`` with ``N = K*G``.

    Causality and the window compare positions (not indices), so the same function serves
    training, prefill and decoding against a cache. Scores and softmax are float32. A query
    with no visible key (only possible with padding) gets a zero output, never NaN.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    scale = H**-0.5 if scale is None else scale
    qg = q.reshape(B, T, K, G, H)  # [B,T,K,G,H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(
        q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=causal, sliding_window=sliding_window
    )[:, None, None]  # [B,1,1,T,S]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - jax.lax.stop_gradient(row_max))
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v)
    return out.reshape(B, T, N, H)  # [B,T,N,H]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the flash-attention kernels (rows of ``q`` and of ``k, v`` per step).

    Attributes:
      block_q: query rows per forward program.
      block_kv: keys per step of the forward loop.
      block_q_bwd: query rows per ``dq`` program and per step of the ``dk, dv`` loop.
      block_kv_bwd: keys per ``dk, dv`` program and per step of the ``dq`` loop.
      num_warps: GPU only; ``None`` picks 4 for ``H <= 64``, else 8.
      num_stages: GPU only: software-pipelining depth of Triton's loops.
      vmem_limit_bytes: TPU only: the scoped VMEM the kernels may use. The key sequence of
        one (batch, KV head) stays in VMEM, double-buffered: about ``4·S·H·itemsize`` bytes
        (8 MiB at S=8192, H=128, bf16); raise this for longer sequences.

    A block larger than the sequence shrinks to it; sequences that are not a multiple of
    the block are padded and the padding masked. On TPU ``block_q`` must be a multiple of 8
    and the others of 128 (they are lane dims of the position and log-sum-exp tiles); on GPU
    every block is a power of two >= 16.
    """

    block_q: int = 128
    block_kv: int = 128
    block_q_bwd: int = 128
    block_kv_bwd: int = 128
    num_warps: int | None = None
    num_stages: int = 2
    vmem_limit_bytes: int | None = None

    def __post_init__(self):
        common.check_positive("BlockSizes", **dataclasses.asdict(self))

    @classmethod
    def default(cls, target: str) -> BlockSizes:
        """Starting points per target: big tiles for the MXU; on GPUs the fastest forward of
        experiments/gpu_tune.py's sweep on an H200 (B=4 T=4096 N=32 K=8 H=128, bf16: 2.28 ms
        against 2.5-6.2 ms for the other 35 configurations; results/gpu_tune_nvidia_h200.md)."""
        if target == "tpu":
            return cls(block_q=256, block_kv=512, block_q_bwd=256, block_kv_bwd=256)
        return cls(block_q=64, block_kv=64, block_q_bwd=64, block_kv_bwd=64, num_warps=4, num_stages=3)


# ----------------------------------------------------------------------------------------------
# pallas_call builders: one per kernel, each for a target.


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    window: int | None
    scale: float
    block_sizes: BlockSizes | None
    interpret: bool

    def kernel_args(self):
        return dict(scale=self.scale, causal=self.causal, window=self.window)


def _fit(name, block, extent, target, interpret, lane):
    return common.fit_block("BlockSizes", name, block, extent, target, interpret, lane=lane, min_gpu=16)


def _head_dim(H, target, interpret):
    """Triton tiles must be powers of two: pad the head dim with zeros (they add nothing to
    ``q·k``, and the padded value columns are sliced off)."""
    return common.next_pow2(H) if target == "gpu" and not interpret else H


def _heads_major(x, rows, width):
    """``[B,T,N,H] -> [B,N,rows,width]``, zero-padded."""
    return common.pad_axis(common.pad_axis(x, 1, rows), 3, width).transpose(0, 2, 1, 3)


def _ids(x, size, *, column):
    """Positions / segment ids ``[B,T]`` as int32 columns ``[B,size,1]`` or rows ``[B,1,size]``;
    padded with the edge value (keeps the visibility bounds tight; padding is masked anyway)."""
    x = _padded_ids(x, size)
    return x[:, :, None] if column else x[:, None, :]


def _padded_ids(x, size):
    return common.pad_axis(x.astype(jnp.int32), 1, size, mode="edge")


def _tile_range_inputs(st, qpos, kvpos, qseg, kvseg, Tp, Sp, bq, bk, *, per_query_tile):
    """``[lo, hi]``, each ``[B,tiles,1]`` int32: for each query tile the key tiles it can see
    (``per_query_tile``), else for each key tile the query tiles that can see it."""
    seg = (None, None) if qseg is None else (_padded_ids(qseg, Tp), _padded_ids(kvseg, Sp))
    vis = _tile_ranges.visible(
        _padded_ids(qpos, Tp),
        _padded_ids(kvpos, Sp),
        *seg,
        block_q=bq,
        block_kv=bk,
        causal=st.causal,
        window=st.window,
    )
    shape = (qpos.shape[0], Tp // bq, Sp // bk)
    lo, hi = _tile_ranges.ranges(vis, shape, axis=2 if per_query_tile else 1)
    return [lo[..., None], hi[..., None]]


def _params(st, target, interpret, H, num_dims):
    bs = st.block_sizes or BlockSizes.default(target)
    warps = bs.num_warps or (4 if H <= 64 else 8)
    return common.compiler_params(
        target,
        interpret,
        semantics=("parallel",) * num_dims,
        num_warps=warps,
        num_stages=bs.num_stages,
        vmem_limit_bytes=bs.vmem_limit_bytes,
    )


def _forward_call(st, target, interpret, q, k, v, qpos, kvpos, qseg, kvseg):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bs = st.block_sizes or BlockSizes.default(target)
    bq = _fit("block_q", bs.block_q, T, target, interpret, lane=False)
    bk = _fit("block_kv", bs.block_kv, S, target, interpret, lane=True)
    Tp, Sp, Hp = common.round_up(T, bq), common.round_up(S, bk), _head_dim(H, target, interpret)
    has_seg = qseg is not None

    col = pl.BlockSpec((None, bq, 1), lambda b, n, i: (b, i, 0))
    row = pl.BlockSpec((None, 1, Sp), lambda b, n, i: (b, 0, 0))
    q_spec = pl.BlockSpec((None, None, bq, Hp), lambda b, n, i: (b, n, i, 0))
    kv_spec = pl.BlockSpec((None, None, Sp, Hp), lambda b, n, i: (b, lax.div(n, G), 0, 0))
    inputs = [_ids(qpos, Tp, column=True), _ids(kvpos, Sp, column=False)]
    specs = [col, row]
    if has_seg:
        inputs += [_ids(qseg, Tp, column=True), _ids(kvseg, Sp, column=False)]
        specs += [col, row]
    inputs += [_heads_major(q, Tp, Hp), _heads_major(k, Sp, Hp), _heads_major(v, Sp, Hp)]
    specs += [q_spec, kv_spec, kv_spec]
    ranged = target == "gpu"
    if ranged:
        tile = pl.BlockSpec((None, 1, 1), lambda b, n, i: (b, i, 0))
        ranges = _tile_range_inputs(st, qpos, kvpos, qseg, kvseg, Tp, Sp, bq, bk, per_query_tile=True)
        inputs, specs = ranges + inputs, [tile, tile] + specs

    kernel = functools.partial(
        fwd_kernel,
        **st.kernel_args(),
        block_kv=bk,
        kv_len=S if Sp != S else None,
        has_seg=has_seg,
        ranged=ranged,
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(B, N, Tp // bq),
        in_specs=specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, bq, 1), lambda b, n, i: (b, n, i, 0))],
        out_shape=[
            jax.ShapeDtypeStruct((B, N, Tp, Hp), q.dtype),
            jax.ShapeDtypeStruct((B, N, Tp, 1), jnp.float32),
        ],
        compiler_params=_params(st, target, interpret, Hp, 3),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*inputs)
    return out[:, :, :T, :H].transpose(0, 2, 1, 3), lse[:, :, :T, 0]  # [B,T,N,H], [B,N,T]


def _backward_call(st, target, interpret, q, k, v, qpos, kvpos, qseg, kvseg, out, lse, do):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bs = st.block_sizes or BlockSizes.default(target)
    bq = _fit("block_q_bwd", bs.block_q_bwd, T, target, interpret, lane=True)
    bk = _fit("block_kv_bwd", bs.block_kv_bwd, S, target, interpret, lane=True)
    Tp, Sp, Hp = common.round_up(T, bq), common.round_up(S, bk), _head_dim(H, target, interpret)
    has_seg = qseg is not None
    kv_len = S if Sp != S else None
    params = _params(st, target, interpret, Hp, 3)

    # delta_t = rowsum(dO ∘ O): the softmax backward's correction, one number per query row.
    delta = jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32), do.astype(jnp.float32))
    lse = common.pad_axis(lse, 2, Tp, mode="constant").at[:, :, T:].set(LSE_EMPTY)  # [B,N,Tp]
    delta = common.pad_axis(delta, 2, Tp)
    qh, doh = _heads_major(q, Tp, Hp), _heads_major(do, Tp, Hp)  # [B,N,Tp,Hp]
    kh, vh = _heads_major(k, Sp, Hp), _heads_major(v, Sp, Hp)  # [B,K,Sp,Hp]

    # dq: grid over query tiles of every head, looping over keys.
    q_col = pl.BlockSpec((None, bq, 1), lambda b, n, i: (b, i, 0))
    kv_row = pl.BlockSpec((None, 1, Sp), lambda b, n, i: (b, 0, 0))
    q_tile = pl.BlockSpec((None, None, bq, Hp), lambda b, n, i: (b, n, i, 0))
    kv_all = pl.BlockSpec((None, None, Sp, Hp), lambda b, n, i: (b, lax.div(n, G), 0, 0))
    stat = pl.BlockSpec((None, None, bq, 1), lambda b, n, i: (b, n, i, 0))
    inputs = [_ids(qpos, Tp, column=True), _ids(kvpos, Sp, column=False)]
    specs = [q_col, kv_row]
    if has_seg:
        inputs += [_ids(qseg, Tp, column=True), _ids(kvseg, Sp, column=False)]
        specs += [q_col, kv_row]
    inputs += [qh, kh, vh, doh, lse[..., None], delta[..., None]]
    specs += [q_tile, kv_all, kv_all, q_tile, stat, stat]
    ranged = target == "gpu"
    ranges = functools.partial(_tile_range_inputs, st, qpos, kvpos, qseg, kvseg, Tp, Sp, bq, bk)
    if ranged:
        tile = pl.BlockSpec((None, 1, 1), lambda b, n, i: (b, i, 0))
        inputs, specs = ranges(per_query_tile=True) + inputs, [tile, tile] + specs
    dq = pl.pallas_call(
        functools.partial(
            dq_kernel, **st.kernel_args(), block_kv=bk, kv_len=kv_len, has_seg=has_seg, ranged=ranged
        ),
        grid=(B, N, Tp // bq),
        in_specs=specs,
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dq",
    )(*inputs)

    # dk, dv: grid over key tiles of every KV head, looping over its G heads' query tiles.
    q_row = pl.BlockSpec((None, 1, Tp), lambda b, h, j: (b, 0, 0))
    kv_col = pl.BlockSpec((None, bk, 1), lambda b, h, j: (b, j, 0))
    q_group = pl.BlockSpec((None, G, Tp, Hp), lambda b, h, j: (b, h, 0, 0))
    kv_tile = pl.BlockSpec((None, None, bk, Hp), lambda b, h, j: (b, h, j, 0))
    stat_t = pl.BlockSpec((None, G, 1, Tp), lambda b, h, j: (b, h, 0, 0))
    inputs = [_ids(qpos, Tp, column=False), _ids(kvpos, Sp, column=True)]
    specs = [q_row, kv_col]
    if has_seg:
        inputs += [_ids(qseg, Tp, column=False), _ids(kvseg, Sp, column=True)]
        specs += [q_row, kv_col]
    inputs += [qh, kh, vh, doh, lse[:, :, None, :], delta[:, :, None, :]]
    specs += [q_group, kv_tile, kv_tile, q_group, stat_t, stat_t]
    if ranged:
        tile = pl.BlockSpec((None, 1, 1), lambda b, h, j: (b, j, 0))
        inputs, specs = ranges(per_query_tile=False) + inputs, [tile, tile] + specs
    dk, dv = pl.pallas_call(
        functools.partial(
            dkv_kernel,
            **st.kernel_args(),
            block_q=bq,
            kv_len=kv_len,
            kv_block=bk,
            has_seg=has_seg,
            ranged=ranged,
        ),
        grid=(B, K, Sp // bk),
        in_specs=specs,
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkv",
    )(*inputs)

    def back(x, rows):  # [B,·,rows_pad,Hp] -> [B,rows,·,H]
        return x[:, :, :rows, :H].transpose(0, 2, 1, 3)

    return back(dq, T), back(dk, S), back(dv, S)


def _forward(st, *args):
    def build(target, interpret):
        return functools.partial(_forward_call, st, target, interpret)

    return common.dispatch(build, *args, interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, qpos, kvpos, qseg, kvseg):
    return _forward(st, q, k, v, qpos, kvpos, qseg, kvseg)[0]


def _flash_fwd(st, q, k, v, qpos, kvpos, qseg, kvseg):
    out, lse = _forward(st, q, k, v, qpos, kvpos, qseg, kvseg)
    return out, (q, k, v, qpos, kvpos, qseg, kvseg, out, lse)


def _flash_bwd(st, res, do):
    def build(target, interpret):
        return functools.partial(_backward_call, st, target, interpret)

    dq, dk, dv = common.dispatch(build, *res, do, interpret=st.interpret)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``attention_reference`` computed by the flash-attention kernels; differentiable.

    Args:
      q: ``[B,T,N,H]`` queries; k, v: ``[B,S,K,H]`` with ``N = K*G`` (GQA; MQA is K=1).
      q_positions, kv_positions: int ``[B,T]``, ``[B,S]``; causality (``kv <= q``) and the
        window (``q - kv < sliding_window``) compare these.
      q_segment_ids, kv_segment_ids: int ``[B,T]``, ``[B,S]`` or both None; a query sees
        only keys of its own segment (packed documents).
      scale: multiplies ``q·k``; default ``H**-0.5``.
      block_sizes: tiles; default ``BlockSizes.default(target)``.
      interpret: run the kernels with the Pallas interpreter (any backend, e.g. CPU).
    Returns:
      ``[B,T,N,H]`` in ``q``'s dtype (k and v are cast to it); a query that sees no key gets
      zeros.
    Raises:
      ValueError: for mismatched shapes or head counts, or block sizes that do not tile.
    """
    _check(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window, block_sizes)
    H = q.shape[-1]
    scale = H**-0.5 if scale is None else float(scale)
    k, v = k.astype(q.dtype), v.astype(q.dtype)  # the kernels' matmuls take one dtype
    st = _Static(bool(causal), sliding_window, scale, block_sizes, bool(interpret))
    return _flash(st, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)


def _check(q, k, v, qpos, kvpos, qseg, kvseg, window, block_sizes):
    for name, x in (("q", q), ("k", k), ("v", v)):
        common.check_rank(name, x, 4, "[B,T,N,H]" if name == "q" else "[B,S,K,H]")
        common.check_dtype(name, x, (jnp.floating,))
    if k.shape != v.shape:
        raise ValueError(f"k has shape {k.shape} but v has {v.shape}: they must match [B,S,K,H]")
    B, T, N, H = q.shape
    _, S, K, Hk = k.shape
    if k.shape[0] != B:
        raise ValueError(f"k has batch {k.shape[0]} but q has {B}")
    if Hk != H:
        raise ValueError(f"k has head dim {Hk} but q has {H}: they must be equal")
    if N % K:
        raise ValueError(f"q has {N} heads, not a multiple of k's {K} KV heads (N = K*G)")
    if T == 0 or S == 0:
        raise ValueError(f"q has {T} positions and k {S}: both must be positive")
    for name, x, shape in (
        ("q_positions", qpos, (B, T)),
        ("kv_positions", kvpos, (B, S)),
        ("q_segment_ids", qseg, (B, T)),
        ("kv_segment_ids", kvseg, (B, S)),
    ):
        if x is None:
            continue
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}: expected {shape}")
        common.check_dtype(name, x, (jnp.integer,))
    if (qseg is None) != (kvseg is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together or not at all")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"sliding_window={window!r} is invalid: must be a positive int or None")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes={block_sizes!r} must be a flash_attention.BlockSizes")
