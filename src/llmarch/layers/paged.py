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
    """

    k_pages: jax.Array
    v_pages: jax.Array
    meta: PageMeta
    layer: jax.Array  # int32 scalar: which layer of the pools this view addresses

    num_slots = None

    @staticmethod
    def empty(
        cfg: ModelConfig, layers: int, num_pages: int, page_size: int, dtype: Any
    ) -> tuple[jax.Array, jax.Array]:
        a = cfg.attention
        shape = (layers, num_pages, page_size, a.num_kv_heads, a.head_dim)  # [L,P,ps,K,H]
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    @property
    def pools(self) -> tuple[jax.Array, jax.Array]:
        return self.k_pages, self.v_pages

    def for_layer(self, layer: jax.Array) -> PagedKVCache:
        return dataclasses.replace(self, layer=layer)

    def write(self, positions: jax.Array, k: jax.Array, v: jax.Array) -> PagedKVCache:
        """Stores ``k, v [B,T,K,H]`` (B*T = the step's N flat tokens) at ``meta.slots``."""
        del positions  # placed by the slots the block manager chose
        return dataclasses.replace(
            self,
            k_pages=_write(self.k_pages, self.layer, self.meta.slots, k),
            v_pages=_write(self.v_pages, self.layer, self.meta.slots, v),
        )

    def attend(
        self, q: jax.Array, positions: jax.Array, *, impl=None, sliding_window: int | None = None
    ) -> jax.Array:
        """``q [B,T,N,H]`` over each token's sequence, causally: ``[B,T,N,H]``."""
        del positions  # each group carries its rows' positions
        k_pages, first = _layer_pages(self.k_pages, self.layer)
        v_pages, _ = _layer_pages(self.v_pages, self.layer)
        k_pages, v_pages = k_pages.astype(q.dtype), v_pages.astype(q.dtype)  # no-ops when equal

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
            )

        return _grouped((q,), self.meta, attend).reshape(q.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLatentCache:
    """A run's paged MLA latent cache: ``c_kv_pages [L,P,page_size,A]``, ``k_r_pages [L,P,page_size,R]``.

    Follows ``MLACache``'s protocol without ``read``: MLA attends it only in the latent space,
    through ``ops.mla_decode`` (as FlashMLA does), for decode steps and prefill chunks alike.
    """

    c_kv_pages: jax.Array
    k_r_pages: jax.Array
    meta: PageMeta
    layer: jax.Array

    num_slots = None

    @staticmethod
    def empty(
        cfg: ModelConfig, layers: int, num_pages: int, page_size: int, dtype: Any
    ) -> tuple[jax.Array, jax.Array]:
        m = cfg.mla
        return (
            jnp.zeros((layers, num_pages, page_size, m.kv_lora_rank), dtype),  # [L,P,ps,A]
            jnp.zeros((layers, num_pages, page_size, m.qk_rope_head_dim), dtype),
        )  # [L,P,ps,R]

    @property
    def pools(self) -> tuple[jax.Array, jax.Array]:
        return self.c_kv_pages, self.k_r_pages

    def for_layer(self, layer: jax.Array) -> PagedLatentCache:
        return dataclasses.replace(self, layer=layer)

    def write(self, positions: jax.Array, c_kv: jax.Array, k_r: jax.Array) -> PagedLatentCache:
        """Stores ``c_kv [B,T,A]``, ``k_r [B,T,R]`` at ``meta.slots``."""
        del positions
        slots = self.meta.slots
        return dataclasses.replace(
            self,
            c_kv_pages=_write(self.c_kv_pages, self.layer, slots, c_kv),
            k_r_pages=_write(self.k_r_pages, self.layer, slots, k_r),
        )

    def attend_latent(
        self, q_latent: jax.Array, q_rope: jax.Array, *, positions: jax.Array, scale: float, impl=None
    ) -> jax.Array:
        """``q_latent [B,T,N,A]``, ``q_rope [B,T,N,R]`` -> latent outputs ``[B,T,N,A]``."""
        del positions
        c_kv, first = _layer_pages(self.c_kv_pages, self.layer)
        k_r, _ = _layer_pages(self.k_r_pages, self.layer)
        c_kv, k_r = c_kv.astype(q_latent.dtype), k_r.astype(q_latent.dtype)  # no-ops when equal

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
            )

        return _grouped((q_latent, q_rope), self.meta, attend).reshape(q_latent.shape)
