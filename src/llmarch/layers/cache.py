"""The decoding-cache protocols the attention layers and the decoder rely on.

A cache is an explicit pytree passed into a layer and returned updated, never module state.
Any class with these methods is one (structural typing): the contiguous ``KVCache``
(``layers/attention.py``) and ``MLACache`` (``layers/mla.py``), and the paged caches of
``llmarch.inference``. Shapes in the axis alphabet; ``[B,T]`` are this call's queries.

``Pooled`` is the one checked at run time (``isinstance``, hence ``runtime_checkable``): a
run of stacked blocks carries such a cache whole through its scan instead of slicing it per
layer. A runtime check only sees that ``for_layer`` exists, which is all that decides it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax


class KVCacheLike(Protocol):
    """One layer's keys and values, as ``Attention`` uses them."""

    @property
    def num_slots(self) -> int | None:
        """The positions it can hold, ``[0, num_slots)``; None when it places tokens itself
        (paged: the block tables decide) and checks nothing up front."""

    def write(self, positions: jax.Array, k: jax.Array, v: jax.Array) -> KVCacheLike:
        """The cache with ``k, v [B,T,K,H]`` stored for ``positions [B,T]``."""

    def attend(
        self, q: jax.Array, positions: jax.Array, *, impl: Any = None, sliding_window: int | None = None
    ) -> jax.Array:
        """``q [B,T,N,H]`` at ``positions [B,T]`` over everything stored so far (this call's
        writes included), causally by position: ``[B,T,N,H]``."""


class LatentCacheLike(Protocol):
    """One layer's MLA latents ``c_KV`` (width A) and RoPE keys ``k_R`` (width R), as ``MLA``
    uses them in the latent (absorbed) space."""

    @property
    def num_slots(self) -> int | None:
        """As ``KVCacheLike.num_slots``."""

    def write(self, positions: jax.Array, c_kv: jax.Array, k_r: jax.Array) -> LatentCacheLike:
        """The cache with ``c_kv [B,T,A]``, ``k_r [B,T,R]`` stored for ``positions [B,T]``."""

    def attend_latent(
        self, q_latent: jax.Array, q_rope: jax.Array, *, positions: jax.Array, scale: float, impl: Any = None
    ) -> jax.Array:
        """Absorbed attention of ``q_latent [B,T,N,A]``, ``q_rope [B,T,N,R]`` at ``positions``
        over everything stored so far: latent outputs ``[B,T,N,A]``."""


@runtime_checkable
class ReadableLatentCache(LatentCacheLike, Protocol):
    """A latent cache whose contents can also be read out whole, so ``MLA``'s naive path
    (expanding the latents into per-head keys and values) can attend over it."""

    def read(self, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(c_kv [B,S,A], k_r [B,S,R], kv_positions [B,S])`` in ``dtype``."""


@runtime_checkable
class Pooled(Protocol):
    """A cache whose pools hold every layer of a run (``[L, ...]``) and which addresses one
    layer at a time; ``BlockRun`` then carries it whole through its scan, so each layer's
    writes update the one buffer in place."""

    def for_layer(self, layer: jax.Array) -> Pooled:
        """The same pools, addressing layer ``layer`` (an int32 scalar, traced in the scan)."""
