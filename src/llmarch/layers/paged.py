"""Paged KV and latent caches (vLLM's PagedAttention, Kwon et al., SOSP 2023) as explicit pytrees.

Every layer's cache is a pool of fixed-size pages, ``[P, page_size, ...]``; a sequence owns
the pages its block table lists, in order, so position ``p`` lives in page
``table[p // page_size]`` at offset ``p % page_size``. The pools of a run of stacked blocks are
stacked on a leading layers axis, ``[L, P, page_size, ...]``. Page 0 of every layer is the
**trash page**: the block manager never hands it out, and padding tokens write there, so a
fixed-shape step can carry padding without touching any sequence's cache.

A serving step flattens its tokens (decode tokens and prefill chunks of many sequences, then
padding) into one row ``[1, N]``. ``PageMeta`` says, for that step, where each token's key and
value go (``slots``, flat ``page * page_size + offset``) and how the queries regroup into rows
for attention: an ``AttentionGroup`` of decode rows ``[B, 1]`` and one of prefill chunks
``[B, T]``, each row with its block table and its number of valid keys. Both caches follow the
protocols of ``layers/cache.py`` (``KVCacheLike``: ``write``/``attend``; ``LatentCacheLike``:
``write``/``attend_latent``; ``Pooled``: ``for_layer``), attending through ``llmarch.ops.paged_attention`` and
``llmarch.ops.mla_decode`` (Pallas kernels on TPU/GPU; on CPU a blocked XLA loop over the
pages, ``kernels_pallas/_paged_xla.py``). They define ``for_layer``, so ``model.BlockRun``
carries the whole pool through its scan and each layer updates it in place.

They live among the layers, beside ``KVCache`` and ``MLACache``, because they implement the
caches' protocols; the pools around them (allocation, attaching to a model, copy-on-write) are
``llmarch.inference.paged_cache``'s.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from llmarch import ops
from llmarch.layers import kv_quant

if TYPE_CHECKING:  # annotations only: config imports the kind registry, which imports this module
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
    # Slots are in range by construction (the block manager's pages, the trash page for padding):
    # promising it lets XLA write in place, where its bounds check (a select over the whole pool
    # when a step writes one token) made it copy the pool for every layer.
    index = layer * (per_layer * ps) + slots
    if index.shape[0] == 1:
        # XLA turns a one-row scatter into a dynamic-update-slice, which it then fuses into each
        # reader of the pool, copying the whole pool per layer (per token at batch-1 decode). The
        # same row written twice stays a scatter, which updates the pool in place.
        index, rows = jnp.concatenate([index, index]), jnp.concatenate([rows, rows])
    return flat.at[index].set(rows, mode="promise_in_bounds").reshape(pages.shape)


def _store(
    pages: jax.Array, scales: jax.Array | None, layer: jax.Array, slots: jax.Array, values: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """``_write`` of ``values`` into a float pool, or of their quantized form into a quantized
    pool and its scale pool (``scales`` not None)."""
    if scales is None:
        return _write(pages, layer, slots, values), None
    q, s = kv_quant.quantize(values, pages.dtype)
    return _write(pages, layer, slots, q), _write(scales, layer, slots, s)


def _empty(shape: tuple[int, ...], dtype: Any) -> tuple[jax.Array, ...]:
    """An empty pool of ``shape``, and its scale pool when ``dtype`` is quantized."""
    if kv_quant.is_quantized(dtype):
        return jnp.zeros(shape, dtype), jnp.zeros(kv_quant.scale_shape(shape), kv_quant.SCALE_DTYPE)
    return (jnp.zeros(shape, dtype),)


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
    """A run's paged keys and values, ``k_pages, v_pages [L, P, page_size, K, H]``.

    Follows ``KVCache``'s protocol for ``Attention``: ``write`` scatters this step's keys and
    values to ``meta.slots`` of the current ``layer``; ``attend`` runs ``ops.paged_attention``
    once per attention group. ``num_slots`` is None: positions are placed by the block tables.
    A quantized cache (pools int8 or float8_e4m3fn, ``llmarch.layers.kv_quant``) also has
    ``k_scales, v_scales [L, P, page_size, K, 1]``: ``write`` quantizes per token and head,
    ``attend`` hands the scales to the op, which applies them as it reads the pages.
    """

    k_pages: jax.Array
    v_pages: jax.Array
    k_scales: jax.Array | None = None
    v_scales: jax.Array | None = None
    meta: PageMeta = dataclasses.field(kw_only=True)
    layer: jax.Array = dataclasses.field(kw_only=True)  # int32 scalar: the layer this view addresses

    num_slots = None

    @staticmethod
    def empty(
        cfg: ModelConfig, layers: int, num_pages: int, page_size: int, dtype: Any
    ) -> tuple[jax.Array, ...]:
        """``(k_pages, v_pages)``, then ``(k_scales, v_scales)`` when ``dtype`` is quantized."""
        a = cfg.attention
        k = _empty((layers, num_pages, page_size, a.num_kv_heads, a.head_dim), dtype)  # [L,P,ps,K,H]
        v = _empty((layers, num_pages, page_size, a.num_kv_heads, a.head_dim), dtype)
        return (k[0], v[0], *k[1:], *v[1:])

    @property
    def pools(self) -> tuple[jax.Array, ...]:
        if self.k_scales is None:
            return self.k_pages, self.v_pages
        return self.k_pages, self.v_pages, self.k_scales, self.v_scales

    def for_layer(self, layer: jax.Array) -> PagedKVCache:
        return dataclasses.replace(self, layer=layer)

    def write(self, positions: jax.Array, k: jax.Array, v: jax.Array) -> PagedKVCache:
        """Stores ``k, v [B,T,K,H]`` (B*T = the step's N flat tokens) at ``meta.slots``."""
        del positions  # placed by the slots the block manager chose
        k_pages, k_scales = _store(self.k_pages, self.k_scales, self.layer, self.meta.slots, k)
        v_pages, v_scales = _store(self.v_pages, self.v_scales, self.layer, self.meta.slots, v)
        return dataclasses.replace(
            self, k_pages=k_pages, v_pages=v_pages, k_scales=k_scales, v_scales=v_scales
        )

    def attend(
        self, q: jax.Array, positions: jax.Array, *, impl=None, sliding_window: int | None = None
    ) -> jax.Array:
        """``q [B,T,N,H]`` over each token's sequence, causally: ``[B,T,N,H]``."""
        del positions  # each group carries its rows' positions
        k_pages, first = _layer_pages(self.k_pages, self.layer)
        v_pages, _ = _layer_pages(self.v_pages, self.layer)
        quantized = {}
        if self.k_scales is None:
            k_pages, v_pages = k_pages.astype(q.dtype), v_pages.astype(q.dtype)  # no-ops when equal
        else:  # read as stored: the op applies the scales
            quantized = dict(
                k_scales=_layer_pages(self.k_scales, self.layer)[0],
                v_scales=_layer_pages(self.v_scales, self.layer)[0],
            )

        def attend(group: AttentionGroup, q_rows: jax.Array) -> jax.Array:
            return ops.paged_attention(
                q_rows,
                k_pages,
                v_pages,
                group.tables + first,
                group.lengths,
                group.positions,
                impl=impl,
                sliding_window=sliding_window,
                **quantized,
            )

        return _grouped((q,), self.meta, attend).reshape(q.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLatentCache:
    """A run's paged MLA latent cache: ``c_kv_pages [L,P,page_size,A]``, ``k_r_pages [L,P,page_size,R]``.

    Follows ``MLACache``'s protocol without ``read``: MLA attends it only in the latent space,
    through ``ops.mla_decode`` (as FlashMLA does), for decode steps and prefill chunks alike.
    Quantized (int8/float8 pools): ``c_kv_scales, k_r_scales [L,P,page_size,1]``, one scale per
    token's latent and per token's RoPE key, as ``PagedKVCache``'s.
    """

    c_kv_pages: jax.Array
    k_r_pages: jax.Array
    c_kv_scales: jax.Array | None = None
    k_r_scales: jax.Array | None = None
    meta: PageMeta = dataclasses.field(kw_only=True)
    layer: jax.Array = dataclasses.field(kw_only=True)

    num_slots = None

    @staticmethod
    def empty(
        cfg: ModelConfig, layers: int, num_pages: int, page_size: int, dtype: Any
    ) -> tuple[jax.Array, ...]:
        """``(c_kv_pages, k_r_pages)``, then their scale pools when ``dtype`` is quantized."""
        m = cfg.mla
        c = _empty((layers, num_pages, page_size, m.kv_lora_rank), dtype)  # [L,P,ps,A]
        r = _empty((layers, num_pages, page_size, m.qk_rope_head_dim), dtype)  # [L,P,ps,R]
        return (c[0], r[0], *c[1:], *r[1:])

    @property
    def pools(self) -> tuple[jax.Array, ...]:
        if self.c_kv_scales is None:
            return self.c_kv_pages, self.k_r_pages
        return self.c_kv_pages, self.k_r_pages, self.c_kv_scales, self.k_r_scales

    def for_layer(self, layer: jax.Array) -> PagedLatentCache:
        return dataclasses.replace(self, layer=layer)

    def write(self, positions: jax.Array, c_kv: jax.Array, k_r: jax.Array) -> PagedLatentCache:
        """Stores ``c_kv [B,T,A]``, ``k_r [B,T,R]`` at ``meta.slots``."""
        del positions
        slots = self.meta.slots
        c_kv_pages, c_kv_scales = _store(self.c_kv_pages, self.c_kv_scales, self.layer, slots, c_kv)
        k_r_pages, k_r_scales = _store(self.k_r_pages, self.k_r_scales, self.layer, slots, k_r)
        return dataclasses.replace(
            self, c_kv_pages=c_kv_pages, k_r_pages=k_r_pages, c_kv_scales=c_kv_scales, k_r_scales=k_r_scales
        )

    def attend_latent(
        self, q_latent: jax.Array, q_rope: jax.Array, *, positions: jax.Array, scale: float, impl=None
    ) -> jax.Array:
        """``q_latent [B,T,N,A]``, ``q_rope [B,T,N,R]`` -> latent outputs ``[B,T,N,A]``."""
        del positions
        c_kv, first = _layer_pages(self.c_kv_pages, self.layer)
        k_r, _ = _layer_pages(self.k_r_pages, self.layer)
        quantized = {}
        if self.c_kv_scales is None:
            c_kv, k_r = c_kv.astype(q_latent.dtype), k_r.astype(q_latent.dtype)  # no-ops when equal
        else:  # read as stored: the op applies the scales
            quantized = dict(
                c_kv_scales=_layer_pages(self.c_kv_scales, self.layer)[0],
                k_rope_scales=_layer_pages(self.k_r_scales, self.layer)[0],
            )

        def attend(group: AttentionGroup, ql: jax.Array, qr: jax.Array) -> jax.Array:
            return ops.mla_decode(
                ql,
                qr,
                c_kv,
                k_r,
                group.tables + first,
                group.lengths,
                group.positions,
                scale=scale,
                impl=impl,
                **quantized,
            )

        return _grouped((q_latent, q_rope), self.meta, attend).reshape(q_latent.shape)
