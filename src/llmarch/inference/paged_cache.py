"""Paged KV and latent caches (vLLM's PagedAttention, Kwon et al., SOSP 2023) as explicit pytrees.

Every layer's cache is a pool of fixed-size pages, ``[pages, page_size, ...]``; a sequence owns
the pages its block table lists, in order, so position ``p`` lives in page
``table[p // page_size]`` at offset ``p % page_size``. The pools of a run of stacked blocks are
stacked on a leading layers axis, ``[L, pages, page_size, ...]``. Page 0 of every layer is the
**trash page**: the block manager never hands it out, and padding tokens write there, so a
fixed-shape step can carry padding without touching any sequence's cache.

A serving step flattens its tokens (decode tokens and prefill chunks of many sequences, then
padding) into one row ``[1, n]``. ``PageMeta`` says, for that step, where each token's key and
value go (``slots``, flat ``page * page_size + offset``) and how the queries regroup into rows
for attention: an ``AttentionGroup`` of decode rows ``[B, 1]`` and one of prefill chunks
``[B, T]``, each row with its block table and its number of valid keys. Both caches follow the
protocols of ``layers/attention.py`` (``write``/``attend``) and ``layers/mla.py``
(``write``/``attend_latent``), attending through ``llmarch.ops.paged_attention`` and
``llmarch.ops.mla_decode`` (Pallas kernels on TPU/GPU, gather + reference attention on CPU).
They define ``for_layer``, so ``model.BlockRun`` carries the whole pool through its scan and
each layer updates it in place. Where ``llmarch.ops`` resolves to the XLA reference (CPU),
``_blocked_attention`` computes the same thing as flash-decoding does, which XLA:CPU runs fast.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kernels_pallas.intmath import cdiv
from llmarch import ops
from llmarch.config import ModelConfig

TRASH_PAGE = 0  # written by padding tokens, never read by a valid query


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionGroup:
    """Rows of one paged-attention call; padding entries have position -1 (zero output).

    Attributes:
      index: int ``[B,T]``: the flat token (in ``[0, n)``) of each query; padding points at 0.
      positions: int ``[B,T]``: each query's position, ``-1`` for padding.
      tables: int ``[B,max_pages]``: each row's block table (unused entries: the trash page).
      lengths: int ``[B]``: valid keys per row, this step's included.
    """

    index: jax.Array
    positions: jax.Array
    tables: jax.Array
    lengths: jax.Array

    @property
    def rows(self) -> int:
        return self.index.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PageMeta:
    """One step's placement of its ``n`` flat tokens: ``slots [n]`` (flat page slot each token
    writes; padding: the trash page) and the attention groups."""

    slots: jax.Array
    groups: tuple[AttentionGroup, ...]


def _layer_pages(pages: jax.Array, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[L,pages,ps,...] -> [L*pages,ps,...]`` (free: a reshape) and the first page id of ``layer``."""
    L, per_layer = pages.shape[:2]
    return pages.reshape(L * per_layer, *pages.shape[2:]), layer * per_layer


def _write(pages: jax.Array, layer: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """Scatters ``values [B,T,...]`` (flattened to ``[n,...]``) into ``layer``'s slots ``[n]``."""
    L, per_layer, ps = pages.shape[:3]
    flat = pages.reshape(L * per_layer * ps, *pages.shape[3:])
    rows = values.reshape(-1, *pages.shape[3:]).astype(pages.dtype)
    return flat.at[layer * (per_layer * ps) + slots].set(rows).reshape(pages.shape)


PAGES_PER_BLOCK = 2  # pages one iteration of the XLA path reads per row


def _blocked_attention(qs: tuple[jax.Array, ...], k_pages: tuple[jax.Array, ...], v_pages: jax.Array,
                       tables: jax.Array, lengths: jax.Array, q_positions: jax.Array, *,
                       scale: float, sliding_window: int | None = None) -> jax.Array:
    """The XLA path of paged attention: a loop over blocks of pages with an online softmax.

    The same function as ``ops.paged_attention``/``ops.mla_decode``'s XLA references (up to
    float rounding), computed the way flash-decoding does: each iteration gathers the next
    ``PAGES_PER_BLOCK`` pages of every row and folds them into a running max, denominator and
    output, and the loop stops after the longest row's last page (a dynamic trip count). So a
    step reads each row's pages once, never materializes the gathered cache, and costs what
    the longest sequence needs, not the table's width. Scores sum over (query, key) parts (MLA:
    ``q_A·c_KV + q_R·k_R``, no concatenation); contractions are batch-major (``BKG·S``), which
    XLA:CPU runs several times faster than the reference's ``BSKH->BTKGH`` value einsum.

    Args:
      qs: ``[B,T,N,H_i]`` query parts; k_pages: matching ``[pages,ps,K,H_i]`` key pools.
      v_pages: ``[pages,ps,K,H_v]``; tables ``[B,max_pages]``; lengths ``[B]``; q_positions
      ``[B,T]`` (-1 pad).
    Returns:
      ``[B,T,N,H_v]``; padding queries (and queries with no visible key) get zeros.
    """
    B, T, N = qs[0].shape[:3]
    ps, K, Hv = v_pages.shape[1:]
    G = N // K
    pb = min(PAGES_PER_BLOCK, tables.shape[1])  # pages per block
    blocks = cdiv(tables.shape[1], pb)
    tables = jnp.pad(tables, ((0, 0), (0, blocks * pb - tables.shape[1])))  # pads: the trash page
    qg = [q.reshape(B, T, K, G, -1).transpose(0, 2, 3, 1, 4) for q in qs]  # [B,K,G,T,H_i]
    qp = q_positions[:, :, None]  # [B,T,1]
    longest = jnp.max(jnp.where(jnp.any(q_positions >= 0, axis=1), lengths, 0))
    trips = cdiv(longest, pb * ps)

    def body(carry):
        i, top, denom, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(tables, i * pb, pb, axis=1)  # [B,pb]
        scores = sum(jnp.einsum("BKGTH,BSKH->BKGTS", q, kp[pages].reshape(B, pb * ps, K, -1),
                                preferred_element_type=jnp.float32)
                     for q, kp in zip(qg, k_pages, strict=True)) * scale  # [B,K,G,T,pb*ps]
        kv = i * pb * ps + jnp.arange(pb * ps, dtype=jnp.int32)[None, None, :]  # slot s: position s
        visible = (kv <= qp) & (kv < lengths[:, None, None])  # [B,T,pb*ps]; qp = -1 sees nothing
        if sliding_window is not None:
            visible &= qp - kv < sliding_window
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1))  # finite: top starts at -1e30
        weights = jnp.exp(scores - new_top[..., None])
        rescale = jnp.exp(top - new_top)
        values = v_pages[pages].reshape(B, pb * ps, K, Hv)
        acc = acc * rescale[..., None] + jnp.einsum("BKGTS,BSKH->BKGTH", weights.astype(values.dtype),
                                                    values, preferred_element_type=jnp.float32)
        return i + 1, new_top, denom * rescale + jnp.sum(weights, axis=-1), acc

    init = (jnp.int32(0), jnp.full((B, K, G, T), -1e30, jnp.float32),
            jnp.zeros((B, K, G, T), jnp.float32), jnp.zeros((B, K, G, T, Hv), jnp.float32))
    _, _, denom, acc = jax.lax.while_loop(lambda c: c[0] < trips, body, init)
    out = acc / jnp.where(denom == 0, 1.0, denom)[..., None]  # [B,K,G,T,H_v]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, Hv).astype(qs[0].dtype)


def _grouped(q_parts: tuple[jax.Array, ...], meta: PageMeta, attend) -> jax.Array:
    """Runs ``attend(group, *q_rows)`` per group on the queries regrouped into its rows, and
    scatters the ``[B,T,...]`` outputs back to the flat ``[n,...]`` order (padding adds 0)."""
    flat = [q.reshape(-1, *q.shape[2:]) for q in q_parts]  # [n,...]
    out = None
    for group in meta.groups:
        if group.rows == 0:  # static: a step without decode rows, or without prefill
            continue
        o = attend(group, *(f[group.index] for f in flat))  # [B,T,heads,width]
        if out is None:
            out = jnp.zeros((flat[0].shape[0], *o.shape[2:]), o.dtype)
        out = out.at[group.index].add(o)
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """A run's paged keys and values, ``k_pages, v_pages [L, pages, page_size, K, H]``.

    Follows ``KVCache``'s protocol for ``Attention``: ``write`` scatters this step's keys and
    values to ``meta.slots`` of the current ``layer``; ``attend`` runs ``ops.paged_attention``
    once per attention group. ``num_slots`` is None: positions are placed by the block tables.
    """

    k_pages: jax.Array
    v_pages: jax.Array
    meta: PageMeta
    layer: jax.Array  # int32 scalar: which layer of the pools this view addresses

    num_slots = None

    @staticmethod
    def empty(cfg: ModelConfig, layers: int, num_pages: int, page_size: int,
              dtype: Any) -> tuple[jax.Array, jax.Array]:
        a = cfg.attention
        shape = (layers, num_pages, page_size, a.num_kv_heads, a.head_dim)  # [L,pages,ps,K,H]
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    @property
    def pools(self) -> tuple[jax.Array, jax.Array]:
        return self.k_pages, self.v_pages

    def for_layer(self, layer: jax.Array) -> PagedKVCache:
        return dataclasses.replace(self, layer=layer)

    def write(self, positions: jax.Array, k: jax.Array, v: jax.Array) -> PagedKVCache:
        """Stores ``k, v [B,T,K,H]`` (B*T = the step's n flat tokens) at ``meta.slots``."""
        del positions  # placed by the slots the block manager chose
        return dataclasses.replace(self, k_pages=_write(self.k_pages, self.layer, self.meta.slots, k),
                                   v_pages=_write(self.v_pages, self.layer, self.meta.slots, v))

    def attend(self, q: jax.Array, positions: jax.Array, *, impl=None,
               sliding_window: int | None = None) -> jax.Array:
        """``q [B,T,N,H]`` over each token's sequence, causally: ``[B,T,N,H]``."""
        del positions  # each group carries its rows' positions
        k_pages, first = _layer_pages(self.k_pages, self.layer)
        v_pages, _ = _layer_pages(self.v_pages, self.layer)

        xla = ops.resolve("paged_attention", impl)[0] is ops.Impl.XLA

        def attend(group: AttentionGroup, q_rows: jax.Array) -> jax.Array:
            tables = group.tables + first
            if xla:
                return _blocked_attention((q_rows,), (k_pages,), v_pages, tables, group.lengths,
                                           group.positions, scale=q.shape[-1] ** -0.5,
                                           sliding_window=sliding_window)
            return ops.paged_attention(q_rows, k_pages.astype(q.dtype), v_pages.astype(q.dtype),
                                       tables, group.lengths, group.positions, impl=impl,
                                       sliding_window=sliding_window)

        return _grouped((q,), self.meta, attend).reshape(q.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLatentCache:
    """A run's paged MLA latent cache: ``c_kv_pages [L,pages,ps,A]``, ``k_r_pages [L,pages,ps,R]``.

    Follows ``MLACache``'s protocol without ``read``: MLA attends it only in the latent space,
    through ``ops.mla_decode`` (as FlashMLA does), for decode steps and prefill chunks alike.
    """

    c_kv_pages: jax.Array
    k_r_pages: jax.Array
    meta: PageMeta
    layer: jax.Array

    num_slots = None

    @staticmethod
    def empty(cfg: ModelConfig, layers: int, num_pages: int, page_size: int,
              dtype: Any) -> tuple[jax.Array, jax.Array]:
        m = cfg.mla
        return (jnp.zeros((layers, num_pages, page_size, m.kv_lora_rank), dtype),  # [L,pages,ps,A]
                jnp.zeros((layers, num_pages, page_size, m.qk_rope_head_dim), dtype))  # [L,pages,ps,R]

    @property
    def pools(self) -> tuple[jax.Array, jax.Array]:
        return self.c_kv_pages, self.k_r_pages

    def for_layer(self, layer: jax.Array) -> PagedLatentCache:
        return dataclasses.replace(self, layer=layer)

    def write(self, positions: jax.Array, c_kv: jax.Array, k_r: jax.Array) -> PagedLatentCache:
        """Stores ``c_kv [B,T,A]``, ``k_r [B,T,R]`` at ``meta.slots``."""
        del positions
        slots = self.meta.slots
        return dataclasses.replace(self, c_kv_pages=_write(self.c_kv_pages, self.layer, slots, c_kv),
                                   k_r_pages=_write(self.k_r_pages, self.layer, slots, k_r))

    def attend_latent(self, q_latent: jax.Array, q_rope: jax.Array, *, positions: jax.Array,
                      scale: float, impl=None) -> jax.Array:
        """``q_latent [B,T,N,A]``, ``q_rope [B,T,N,R]`` -> latent outputs ``[B,T,N,A]``."""
        del positions
        c_kv, first = _layer_pages(self.c_kv_pages, self.layer)
        k_r, _ = _layer_pages(self.k_r_pages, self.layer)

        xla = ops.resolve("mla_decode", impl)[0] is ops.Impl.XLA

        def attend(group: AttentionGroup, ql: jax.Array, qr: jax.Array) -> jax.Array:
            tables = group.tables + first
            if xla:  # one KV head: keys [c_KV; k_R] as two parts, values c_KV
                c, r = c_kv[:, :, None], k_r[:, :, None]  # [pages,ps,1,A], [pages,ps,1,R]
                return _blocked_attention((ql, qr), (c, r), c, tables, group.lengths,
                                           group.positions, scale=scale)
            return ops.mla_decode(ql, qr, c_kv.astype(ql.dtype), k_r.astype(ql.dtype), tables,
                                  group.lengths, group.positions, scale=scale, impl=impl)

        return _grouped((q_latent, q_rope), self.meta, attend).reshape(q_latent.shape)


# attention kind -> its paged cache. Kinds without one cannot be served by the engine.
PAGED_CACHES: dict[str, type] = {"mha": PagedKVCache, "mla": PagedLatentCache}


def cache_kinds(model) -> tuple[str, ...]:
    """The attention kind of each run of ``model`` (``model.runs``), checked to be pageable."""
    kinds = tuple(run.block.attention for run in model.runs)
    for kind in kinds:
        if kind not in PAGED_CACHES:
            raise ValueError(f"attention kind {kind!r} has no paged cache; pageable kinds: "
                             f"{sorted(PAGED_CACHES)}")
    return kinds


def init_pools(model, num_pages: int, page_size: int, dtype: Any = None) -> list[tuple[jax.Array, ...]]:
    """Empty page pools for every run of ``model``: a list of per-run array tuples."""
    dtype = jnp.dtype(model.cfg.dtype if dtype is None else dtype)
    return [PAGED_CACHES[kind].empty(model.cfg, run.count, num_pages, page_size, dtype)
            for kind, run in zip(cache_kinds(model), model.runs, strict=True)]


def bytes_per_page(model, page_size: int, dtype: Any = None) -> int:
    """Bytes one page takes across every layer (all runs, all pools)."""
    pools = jax.eval_shape(lambda: init_pools(model, 1, page_size, dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pools))


def attach(kinds: tuple[str, ...], pools: list[tuple[jax.Array, ...]], meta: PageMeta) -> list:
    """The per-run cache objects the model takes, over ``pools``, for one step's ``meta``."""
    return [PAGED_CACHES[kind](*pool, meta=meta, layer=jnp.int32(0))
            for kind, pool in zip(kinds, pools, strict=True)]


def copy_pages(pools: list[tuple[jax.Array, ...]], src: jax.Array, dst: jax.Array) -> list:
    """Copy-on-write: page ``src[i]`` -> ``dst[i]`` in every layer (trash -> trash pads)."""
    return [tuple(x.at[:, dst].set(x[:, src]) for x in pool) for pool in pools]
