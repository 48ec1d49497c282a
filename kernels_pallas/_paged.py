"""The attention-over-a-paged-cache kernel that ``paged_attention`` and ``mla_decode`` share.

One program attends ``rows`` query rows (the ``T`` query tokens times the ``G`` query heads
of one KV head, row ``t*G + g``) of one sequence over the pages its block table lists, with
an online softmax. Scores are a sum of ``q_i · k_i`` over *score parts* (GQA: one part,
``q·k``; absorbed MLA: ``q_A·c_KV + q_R·k_R``) and values come from one of the caches (GQA:
``v``; MLA: ``c_KV`` itself). Key ``s`` of a sequence lives in slot ``s % page_size`` of page
``block_tables[b, s // page_size]``; it is visible to a query row at position ``p`` when
``s < lengths[b]``, ``s <= p`` and (with a window) ``p - s < window``. A query row at position
``-1`` (padding) sees nothing and gets zeros.

The pages of a sequence are cut into ``num_splits`` ranges attended in parallel and merged
by their log-sum-exp afterwards (flash-decoding), so a small decode batch still fills the
chip. Only pages that hold a visible key are read: ``first_key[b]`` and ``key_limit[b]``
(from the query positions, the window and the length) bound them.

TPU: grid ``(B, K, splits, blocks)``; each step reads ``pages_per_block`` pages through
BlockSpecs whose index maps look up the block table (scalar prefetch), clamped into the
needed range so a skipped step re-uses the resident page instead of copying a new one; the
softmax state lives in VMEM scratch across the ``blocks`` axis. GPU (Triton): grid
``(B, K, splits)``; the program loops over its pages, reading each page's id from the table
and the page by pointer offset.
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

from kernels_pallas import _common as common

LSE_EMPTY = common.MASKED  # log-sum-exp of a split that saw no key: weight exp(MASKED - m) = 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Work split of the paged kernels.

    Attributes:
      pages_per_block: pages read per grid step on TPU (each its own BlockSpec); GPU reads
        one page per loop iteration.
      num_splits: page ranges of one sequence attended in parallel, then merged.
      num_warps, num_stages: GPU only.
      rows_per_block: GPU only: query rows (the query heads of one KV head, times the tokens
        of each sequence) per program, a power of two >= 16; more rows are split across
        programs that each read the pages. MLA decoding has all of its heads on one latent
        "KV head": 128 rows of 512-wide latents do not fit a Hopper SM's 227 KiB of shared
        memory (nor its registers) in one program.
    """

    pages_per_block: int = 8
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    rows_per_block: int = 64

    def __post_init__(self):
        common.check_positive(
            "BlockSizes",
            pages_per_block=self.pages_per_block,
            num_splits=self.num_splits,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
            rows_per_block=self.rows_per_block,
        )

    @classmethod
    def default(cls, target: str, rows: int = 1) -> BlockSizes:
        """Per target, and on GPU per query rows per KV head (``rows``): the fastest of
        experiments/gpu_tune.py's sweep on an H200 (results/gpu_tune_nvidia_h200.md) for GQA
        decoding (4 rows) and for MLA decoding (128 rows: 32 per program)."""
        if target == "tpu":
            return cls(pages_per_block=8, num_splits=1)
        if rows > 64:
            return cls(pages_per_block=1, num_splits=2, num_warps=4, num_stages=2, rows_per_block=32)
        return cls(pages_per_block=1, num_splits=4, num_warps=4, num_stages=3)


@dataclasses.dataclass(frozen=True)
class Cache:
    """How the kernel reads one paged cache ``[pages, page_size, width]``: ``width`` columns, at
    column block ``k`` (the KV head) when ``per_head``, else columns ``[0, width)``."""

    width: int
    per_head: bool


@dataclasses.dataclass(frozen=True)
class Spec:
    """A paged attention problem: caches, which of them score (paired in order with the query
    parts) and which holds the values (its first ``value_width`` columns)."""

    caches: tuple[Cache, ...]
    score_caches: tuple[int, ...]
    value_cache: int
    value_width: int
    page_size: int
    scale: float
    window: int | None
    block_sizes: BlockSizes | None
    interpret: bool
    name: str


def _bounds(q_positions, lengths, window):
    """``first_key, key_limit [B]``: keys outside ``[first, limit)`` are visible to no row."""
    valid = q_positions >= 0
    max_pos = jnp.max(jnp.where(valid, q_positions, -1), axis=1)
    limit = jnp.clip(max_pos + 1, 0, lengths)
    if window is None:
        first = jnp.zeros_like(limit)
    else:
        min_pos = jnp.min(jnp.where(valid, q_positions, jnp.iinfo(jnp.int32).max), axis=1)
        first = jnp.clip(min_pos - window + 1, 0, limit)
    return first.astype(jnp.int32), limit.astype(jnp.int32)


def _update(carry, q_parts, k_parts, v, q_pos, key0, key_limit, *, spec, page_size):
    """One page of online softmax. ``carry = (acc [rows,Hv], m [rows,1], l [rows,1])``; keys
    from ``key0``, visible below ``key_limit`` (the length), at or before a row's position."""
    acc, m, l = carry
    s = None
    for q, k in zip(q_parts, k_parts, strict=True):
        part = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = part if s is None else s + part
    s = s * spec.scale  # [rows, page_size]
    key = key0 + lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
    mask = (key <= q_pos) & (key < key_limit)  # q_pos [rows,1]; padded rows (-1) see nothing
    if spec.window is not None:
        mask &= q_pos - key < spec.window
    s = jnp.where(mask, s, common.MASKED)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return acc, m_new, l


def _finish(acc, m, l):
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    return acc / l_safe, jnp.where(empty, LSE_EMPTY, m + jnp.log(l_safe))


def _split_range(split, pages_per_split, first, limit, page_size):
    """Pages ``[lo, hi)`` of the sequence that this split reads."""
    lo = jnp.maximum(split * pages_per_split, common.div(first, page_size))
    hi = jnp.minimum((split + 1) * pages_per_split, common.div(limit + page_size - 1, page_size))
    return lo, hi


# ----------------------------------------------------------------------------------------------
# TPU


def _tpu_kernel(tables_ref, first_ref, limit_ref, *refs, spec, num_q, ppb, pages_per_split, max_pages):
    qpos_ref, q_refs = refs[0], refs[1 : 1 + num_q]
    n_cache = len(spec.caches)
    cache_refs = [refs[1 + num_q + c * ppb : 1 + num_q + (c + 1) * ppb] for c in range(n_cache)]
    o_ref, lse_ref, acc_ref, m_ref, l_ref = refs[1 + num_q + n_cache * ppb :]
    b, split, blk = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo, hi = _split_range(split, pages_per_split, first_ref[b], limit_ref[b], spec.page_size)

    @pl.when(blk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, common.MASKED)
        l_ref[...] = jnp.zeros_like(l_ref)

    q_pos = qpos_ref[...]
    for j in range(ppb):
        page = split * pages_per_split + blk * ppb + j

        @pl.when((page >= lo) & (page < hi))
        def _(j=j, page=page):
            k_parts = [cache_refs[c][j][...] for c in spec.score_caches]
            v = cache_refs[spec.value_cache][j][...]
            if v.shape[1] != spec.value_width:
                v = v[:, : spec.value_width]
            carry = (acc_ref[...], m_ref[...], l_ref[...])
            acc, m, l = _update(
                carry,
                [r[...] for r in q_refs],
                k_parts,
                v,
                q_pos,
                page * spec.page_size,
                limit_ref[b],
                spec=spec,
                page_size=spec.page_size,
            )
            acc_ref[...], m_ref[...], l_ref[...] = acc, m, l

    @pl.when(blk == pl.num_programs(3) - 1)
    def _():
        o, lse = _finish(acc_ref[...], m_ref[...], l_ref[...])
        o_ref[...] = o
        lse_ref[...] = lse


def _tpu_call(spec, interpret, bs, q_parts, qpos, caches, tables, first, limit, num_splits):
    B, K, rows, _ = q_parts[0].shape
    max_pages, num_pages = tables.shape[1], caches[0].shape[0]
    ppb = min(bs.pages_per_block, max_pages)
    pages_per_split = common.cdiv(max_pages, num_splits)
    blocks = common.cdiv(pages_per_split, ppb)
    Hv = spec.value_width
    ps = spec.page_size

    def page_map(c: Cache, j: int):
        def index_map(b, k, split, blk, tables_ref, first_ref, limit_ref):
            lo, hi = _split_range(split, pages_per_split, first_ref[b], limit_ref[b], ps)
            page = split * pages_per_split + blk * ppb + j
            # Outside [lo, hi) re-use a needed page: no new copy, and no table entry past the
            # sequence's pages (those may hold anything); the id is clamped into the pool too.
            last = jnp.maximum(common.div(limit_ref[b] + ps - 1, ps) - 1, 0)
            page = jnp.clip(jnp.clip(page, lo, jnp.maximum(hi - 1, lo)), 0, last)
            page_id = jnp.clip(tables_ref[b * max_pages + page], 0, num_pages - 1)
            return page_id, 0, (k if c.per_head else 0)

        return pl.BlockSpec((None, ps, c.width), index_map)

    q_specs = [
        pl.BlockSpec((None, None, rows, q.shape[3]), lambda b, k, s, i, *_: (b, k, 0, 0)) for q in q_parts
    ]
    cache_specs = [page_map(c, j) for c in spec.caches for j in range(ppb)]
    out_block = pl.BlockSpec((None, None, None, rows, Hv), lambda b, k, s, i, *_: (b, k, s, 0, 0))
    lse_block = pl.BlockSpec((None, None, None, rows, 1), lambda b, k, s, i, *_: (b, k, s, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(B, K, num_splits, blocks),
        in_specs=[pl.BlockSpec((None, rows, 1), lambda b, k, s, i, *_: (b, 0, 0)), *q_specs, *cache_specs],
        out_specs=[out_block, lse_block],
        scratch_shapes=[
            pltpu.VMEM((rows, Hv), jnp.float32),
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, 1), jnp.float32),
        ],
    )
    kernel = functools.partial(
        _tpu_kernel,
        spec=spec,
        num_q=len(q_parts),
        ppb=ppb,
        pages_per_split=pages_per_split,
        max_pages=max_pages,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((B, K, num_splits, rows, Hv), jnp.float32),
            jax.ShapeDtypeStruct((B, K, num_splits, rows, 1), jnp.float32),
        ],
        compiler_params=common.compiler_params(
            "tpu", interpret, semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name=spec.name,
    )(tables.reshape(-1), first, limit, qpos, *q_parts, *[x for x in caches for _ in range(ppb)])


# ----------------------------------------------------------------------------------------------
# GPU (Triton)


def _gpu_kernel(tables_ref, first_ref, limit_ref, qpos_ref, *refs, spec, num_q, pages_per_split):
    q_refs = refs[:num_q]
    n_cache = len(spec.caches)
    cache_refs = refs[num_q : num_q + n_cache]
    o_ref, lse_ref = refs[num_q + n_cache :]
    b, k, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lo, hi = _split_range(split, pages_per_split, first_ref[b], limit_ref[b], spec.page_size)
    q_parts = [r[...] for r in q_refs]
    q_pos = qpos_ref[...]

    def read(c, page_id):
        cache = spec.caches[c]
        cols = pl.ds(k * cache.width, cache.width) if cache.per_head else pl.ds(0, cache.width)
        return cache_refs[c][page_id, :, cols]  # [page_size, width]

    num_pages = cache_refs[0].shape[0]

    def body(page, carry):
        page_id = jnp.clip(tables_ref[b, page], 0, num_pages - 1)  # memory-safe even if unchecked
        k_parts = [read(c, page_id) for c in spec.score_caches]
        v = read(spec.value_cache, page_id)
        if v.shape[1] != spec.value_width:
            v = v[:, : spec.value_width]
        return _update(
            carry,
            q_parts,
            k_parts,
            v,
            q_pos,
            page * spec.page_size,
            limit_ref[b],
            spec=spec,
            page_size=spec.page_size,
        )

    rows = q_pos.shape[0]
    init = (
        jnp.zeros((rows, spec.value_width), jnp.float32),
        jnp.full((rows, 1), common.MASKED, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
    )
    o, lse = _finish(*lax.fori_loop(lo, jnp.maximum(hi, lo), body, init))
    o_ref[...] = o
    lse_ref[...] = lse


def _gpu_call(spec, interpret, bs, q_parts, qpos, caches, tables, first, limit, num_splits):
    B, K, rows, _ = q_parts[0].shape
    pages_per_split = common.cdiv(tables.shape[1], num_splits)
    Hv = spec.value_width
    rb = min(rows, bs.rows_per_block)  # divides rows (see attend)

    def whole(x):
        return pl.BlockSpec(x.shape, lambda b, k, s, r, nd=x.ndim: (0,) * nd)

    q_specs = [pl.BlockSpec((None, None, rb, q.shape[3]), lambda b, k, s, r: (b, k, r, 0)) for q in q_parts]
    kernel = functools.partial(_gpu_kernel, spec=spec, num_q=len(q_parts), pages_per_split=pages_per_split)
    return pl.pallas_call(
        kernel,
        grid=(B, K, num_splits, rows // rb),
        in_specs=[
            whole(tables),
            whole(first),
            whole(limit),
            pl.BlockSpec((None, rb, 1), lambda b, k, s, r: (b, r, 0)),
            *q_specs,
            *[whole(x) for x in caches],
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rb, Hv), lambda b, k, s, r: (b, k, s, r, 0)),
            pl.BlockSpec((None, None, None, rb, 1), lambda b, k, s, r: (b, k, s, r, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, num_splits, rows, Hv), jnp.float32),
            jax.ShapeDtypeStruct((B, K, num_splits, rows, 1), jnp.float32),
        ],
        compiler_params=common.compiler_params(
            "gpu", interpret, num_warps=bs.num_warps, num_stages=bs.num_stages
        ),
        interpret=interpret,
        name=spec.name,
    )(tables, first, limit, qpos, *q_parts, *caches)


# ----------------------------------------------------------------------------------------------


def attend(
    spec: Spec, target: str, interpret: bool, q_parts, caches, tables, lengths, q_positions, num_kv_heads: int
):
    """``[B,T,N,Hv]``: queries ``q_parts`` (each ``[B,T,N,w_i]``) over the paged ``caches``
    (each ``[pages, page_size, width]``), in float32 (callers cast)."""
    B, T, N, _ = q_parts[0].shape
    K = num_kv_heads
    G = N // K
    bs = spec.block_sizes or BlockSizes.default(target, rows=T * G)
    rows = T * G
    if interpret:  # any size; whole row blocks for the GPU build
        rows_p = common.round_up(rows, bs.rows_per_block) if target == "gpu" else rows
    elif target == "tpu":
        rows_p = common.round_up(rows, 8)
        _check_tpu_tiles(spec, K)
    else:
        rows_p = max(16, common.next_pow2(rows))
        if bs.rows_per_block < 16 or bs.rows_per_block & (bs.rows_per_block - 1):
            raise ValueError(
                f"BlockSizes.rows_per_block={bs.rows_per_block} does not tile on GPU (Triton): "
                "must be a power of two >= 16"
            )
        _check_gpu_tiles(spec)

    def by_kv_head(x):  # [B,T,N,w] -> [B,K,rows_p,w], row t*G + g
        w = x.shape[-1]
        x = x.reshape(B, T, K, G, w).transpose(0, 2, 1, 3, 4).reshape(B, K, rows, w)
        return common.pad_axis(x, 2, rows_p)

    qpos = jnp.repeat(q_positions.astype(jnp.int32), G, axis=1)  # [B,rows], row t*G + g
    qpos = common.pad_axis(qpos, 1, rows_p, mode="constant").at[:, rows:].set(-1)[:, :, None]
    first, limit = _bounds(q_positions.astype(jnp.int32), lengths.astype(jnp.int32), spec.window)
    num_splits = min(bs.num_splits, tables.shape[1])
    call = _tpu_call if target == "tpu" else _gpu_call
    o, lse = call(
        spec,
        interpret,
        bs,
        [by_kv_head(q) for q in q_parts],
        qpos,
        caches,
        tables.astype(jnp.int32),
        first,
        limit,
        num_splits,
    )
    # Merge the splits by their log-sum-exp: [B,K,splits,rows,·].
    m = jnp.max(lse, axis=2, keepdims=True)
    w = jnp.exp(lse - m)
    o = jnp.sum(w * o, axis=2) / jnp.sum(w, axis=2)  # [B,K,rows_p,Hv]
    o = o[:, :, :rows].reshape(B, K, T, G, -1).transpose(0, 2, 1, 3, 4)
    return o.reshape(B, T, N, -1)


def _check_tpu_tiles(spec: Spec, num_kv_heads: int) -> None:
    """A per-head page tile ``[page_size, H]`` of a ``[pages, page_size, K*H]`` pool is a lane
    slice: Mosaic needs H to be a multiple of 128 unless it is the whole row (K = 1)."""
    for c in spec.caches:
        if c.per_head and num_kv_heads > 1 and c.width % 128:
            raise ValueError(
                f"head dim H={c.width} with K={num_kv_heads} KV heads does not tile on "
                "TPU: a page's per-head slice needs H % 128 == 0 (or K = 1)"
            )


def _check_gpu_tiles(spec: Spec) -> None:
    """Triton loads power-of-two tiles and its dot needs 16 keys."""
    ps = spec.page_size
    if ps < 16 or ps & (ps - 1):
        raise ValueError(f"page_size={ps} does not tile on GPU (Triton): must be a power of two >= 16")
    for c in spec.caches:
        if c.width & (c.width - 1):
            raise ValueError(f"head width {c.width} does not tile on GPU (Triton): must be a power of two")


def run(spec: Spec, q_parts, caches, tables, lengths, q_positions, num_kv_heads: int):
    def build(target, interpret):
        def fn(q_parts, caches, tables, lengths, q_positions):
            return attend(
                spec, target, interpret, q_parts, caches, tables, lengths, q_positions, num_kv_heads
            )

        return fn

    return common.dispatch(build, q_parts, caches, tables, lengths, q_positions, interpret=spec.interpret)


def check_tables(
    block_tables, lengths, q_positions, *, batch: int, queries: int, num_pages: int, page_size: int
) -> None:
    """Shapes always; values when concrete: lengths fit the table, used entries hit the cache."""
    common.check_rank("block_tables", block_tables, 2, "[B, max_pages]")
    common.check_rank("lengths", lengths, 1, "[B]")
    common.check_rank("q_positions", q_positions, 2, "[B,T]")
    for name, x in (("block_tables", block_tables), ("lengths", lengths), ("q_positions", q_positions)):
        common.check_dtype(name, x, (jnp.integer,))
    if block_tables.shape[0] != batch or lengths.shape[0] != batch:
        raise ValueError(
            f"block_tables has batch {block_tables.shape[0]} and lengths "
            f"{lengths.shape[0]}: both must equal q's batch {batch}"
        )
    if tuple(q_positions.shape) != (batch, queries):
        raise ValueError(f"q_positions has shape {tuple(q_positions.shape)}: expected {(batch, queries)}")
    max_pages = block_tables.shape[1]
    if max_pages == 0:
        raise ValueError("block_tables has no columns: each sequence needs at least one page slot")
    if not common.is_concrete(block_tables, lengths):
        return
    lens, tables = np.asarray(lengths), np.asarray(block_tables)
    if lens.size and (lens.min() < 0 or lens.max() > max_pages * page_size):
        raise ValueError(
            f"lengths span [{lens.min()}, {lens.max()}]: a table of {max_pages} pages "
            f"of {page_size} allows [0, {max_pages * page_size}]"
        )
    for b, n in enumerate(lens):
        used = tables[b, : common.cdiv(int(n), page_size)]
        bad = np.flatnonzero((used < 0) | (used >= num_pages))
        if bad.size:
            p = int(bad[0])
            raise ValueError(
                f"block_tables[{b}, {p}]={int(used[p])} points past the cache: it "
                f"has {num_pages} pages (sequence {b} uses {used.size} pages)"
            )
