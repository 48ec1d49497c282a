"""Page pools for serving: one pool per run of the model, each a tuple of ``[L, P, page_size, ...]``
arrays, and the per-step cache objects over them.

The caches themselves (``PagedKVCache``, ``PagedLatentCache``, ``PageMeta``, ``AttentionGroup``,
the trash page) are ``llmarch.layers.paged``'s; this module allocates their pools, attaches
them to a model for one step, and copies pages for copy-on-write.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from llmarch.layers import kinds
from llmarch.layers.paged import PageMeta


def cache_kinds(model) -> tuple[str, ...]:
    """The attention kind of each run of ``model`` (``model.runs``), checked to be pageable."""
    names = tuple(run.block.attention for run in model.runs)
    for name in names:
        if kinds.attention(name).paged_cache is None:
            pageable = [n for n in kinds.names("attention") if kinds.attention(n).paged_cache is not None]
            raise ValueError(f"attention kind {name!r} has no paged cache; pageable kinds: {pageable}")
    return names


def init_pools(model, num_pages: int, page_size: int, dtype: Any = None) -> list[tuple[jax.Array, ...]]:
    """Empty page pools for every run of ``model``: a list of per-run array tuples."""
    dtype = jnp.dtype(model.cfg.dtype if dtype is None else dtype)
    return [
        kinds.attention(kind).paged_cache.empty(model.cfg, run.count, num_pages, page_size, dtype)
        for kind, run in zip(cache_kinds(model), model.runs, strict=True)
    ]


def attach(names: tuple[str, ...], pools: list[tuple[jax.Array, ...]], meta: PageMeta) -> list:
    """The per-run cache objects the model takes, over ``pools``, for one step's ``meta``."""
    return [
        kinds.attention(kind).paged_cache(*pool, meta=meta, layer=jnp.int32(0))
        for kind, pool in zip(names, pools, strict=True)
    ]


def copy_pages(pools: list[tuple[jax.Array, ...]], src: jax.Array, dst: jax.Array) -> list:
    """Copy-on-write: page ``src[i]`` -> ``dst[i]`` in every layer (trash -> trash pads)."""
    # Page ids are in range by construction; see layers.paged._write for why it is promised.
    return [tuple(x.at[:, dst].set(x[:, src], mode="promise_in_bounds") for x in pool) for pool in pools]
