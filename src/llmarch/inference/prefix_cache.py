"""Automatic prefix caching (vLLM's APC): full cache pages found again by what they hold.

A page's keys and values are a function of the tokens in it *and every token before it* (each
layer's keys mix in the earlier positions through attention), so a full page is named by a chain
hash: ``h_j = sha256(h_{j-1} || tokens of page j)``, starting from ``ROOT``. Equal hashes mean equal
prefixes, so a request whose prompt starts with a prefix another request already computed can
point its block table at those pages and start its prefill after them: a shared system prompt is
prefilled once. SHA-256 rather than Python's ``hash``: a collision would silently hand one
request another's keys and values, and a server's clients choose the tokens.

``PrefixCache`` is the table ``hash -> page`` (and back) over the pages of a ``BlockManager``
that hold a full page of computed tokens. A cached page held by no sequence is not freed but kept,
*evictable*, in least-recently-released order; the block manager hands out never-cached free
pages first and evicts the oldest evictable page only when none is left. Two sequences that
computed the same page at the same time keep their own copies; only the first is cached (block
tables stay append-only, as in vLLM).

What else a page's contents depend on, and why reuse is exact here (``unsafe_reason``):

- The model's weights, ``EngineConfig.kv_cache_dtype`` and the page size are fixed per engine,
  and each engine has its own pool and table, so they need not enter the hash. Images do change
  keys and values per request: their features stand in for placeholder tokens that are the same
  ids for every image. A request with images starts its chain from ``root_for_images`` (the
  images' bytes hashed into ``ROOT``) instead of ``ROOT``, so its pages are found again only by a
  request with the same images and tokens (vLLM hashes each image into the pages it covers, which
  also shares the text before it; a whole-request root is simpler and as exact).
- Positions: a prefix always starts at position 0, so a page always sits at the same positions
  (RoPE, including scaled RoPE, is a function of the position alone).
- Quantized caches (int8/fp8) scale each token and head separately, stored in the same page slot:
  a page's scales are its own tokens'.
- MLA's latent cache holds per-token latents and RoPE keys: the same argument as keys and values.
- Sliding windows mask keys at read time; the engine keeps every page of a sequence, so a reused
  prefix is complete. (A manager that freed pages outside the window would have to check that
  the pages a hit needs are still there.)
- Memory layers (PKM, UltraMem) and dropless or dense MoE act on each token alone. MoE with
  ``strategy="capacity"`` does not: an expert's capacity is shared by every token of a step, so
  whether a token is dropped (and so its hidden state and the keys and values of the layers above)
  depends on which other tokens ran in the same step. Such models cannot reuse pages exactly;
  the engine turns prefix caching off for them.
"""

from __future__ import annotations

import collections
import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only
    from llmarch.config import ModelConfig

ROOT = hashlib.sha256(b"llmarch prefix cache v1").digest()  # the hash "before" the first page


def extend_hashes(
    hashes: list[bytes], tokens: list[int], page_size: int, num_pages: int, root: bytes = ROOT
) -> list[bytes]:
    """Extends ``hashes`` (the chain hashes of the first full pages of ``tokens``, from ``root``)
    in place to ``num_pages`` pages; returns it. Pages past ``len(tokens) // page_size`` are not
    full and have no hash."""
    if num_pages * page_size > len(tokens):
        raise ValueError(
            f"num_pages={num_pages} is invalid: {len(tokens)} tokens fill only "
            f"{len(tokens) // page_size} pages of {page_size}"
        )
    for j in range(len(hashes), num_pages):
        parent = hashes[j - 1] if j else root
        block = np.asarray(tokens[j * page_size : (j + 1) * page_size], "<i8").tobytes()
        hashes.append(hashlib.sha256(parent + block).digest())
    return hashes


def root_for_images(images: np.ndarray) -> bytes:
    """The chain's root for a request with ``images`` (pixel values, any shape): their dtype,
    shape and bytes hashed into ``ROOT``."""
    images = np.ascontiguousarray(images)
    head = f"images {images.dtype.str} {images.shape}".encode()
    return hashlib.sha256(ROOT + head + images.tobytes()).digest()


def unsafe_reason(cfg: ModelConfig) -> str | None:
    """Why pages of ``cfg``'s model cannot be reused across requests exactly, or None when they can
    (see the module's docs for what was considered)."""
    moe = getattr(cfg, "moe", None)
    if moe is not None and moe.strategy == "capacity":
        return (
            "MoEConfig.strategy='capacity' drops tokens by what else runs in the same step, so a "
            "page's keys and values depend on more than its prefix"
        )
    return None


class PrefixCache:
    """The table of cached pages and the least-recently-released order of the evictable ones.

    Pure bookkeeping over page ids: the ``BlockManager`` owns the reference counts and decides
    when a page becomes evictable (``park``), is held again (``unpark``) or is reused (``evict``).

    Counters (for ``Engine.stats``): ``queries`` (sequences that looked up their prefix),
    ``query_tokens`` (their tokens), ``hit_tokens`` (tokens found cached, not computed) and
    ``evictions`` (cached pages dropped for reuse).
    """

    def __init__(self):
        self._page: dict[bytes, int] = {}  # hash -> page
        self._hash: dict[int, bytes] = {}  # page -> hash
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest first
        self.queries = self.query_tokens = self.hit_tokens = self.evictions = 0

    def __len__(self) -> int:
        """Pages in the table (held or evictable)."""
        return len(self._page)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def evictable_pages(self) -> list[int]:
        """The evictable pages, the next to be evicted first."""
        return list(self._evictable)

    def is_cached(self, page: int) -> bool:
        return page in self._hash

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached pages of the longest run of ``hashes`` from the first (a prefix's pages)."""
        pages = []
        for h in hashes:
            page = self._page.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def add(self, page: int, h: bytes) -> bool:
        """Caches ``page`` (a full page of computed tokens, held) as ``h``; False when ``h`` is
        already cached as another page (the first stays) or ``page`` is cached already."""
        if h in self._page or page in self._hash:
            return False
        self._page[h], self._hash[page] = page, h
        return True

    def park(self, page: int) -> None:
        """``page`` (cached) is held by nobody now: evictable, the most recently released."""
        self._evictable[page] = None

    def unpark(self, page: int) -> None:
        """``page`` (evictable) is held again."""
        del self._evictable[page]

    def evict(self) -> int:
        """Drops the least recently released evictable page from the table; returns it."""
        page, _ = self._evictable.popitem(last=False)
        del self._page[self._hash.pop(page)]
        self.evictions += 1
        return page

    def record(self, query_tokens: int, hit_tokens: int) -> None:
        """Counts one lookup of ``query_tokens`` tokens that found ``hit_tokens`` cached."""
        self.queries += 1
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens

    def check(self, refcount: np.ndarray) -> None:
        """Asserts the table is one-to-one and the evictable pages are exactly the cached pages
        nobody holds (a test helper; ``refcount``: the block manager's)."""
        if {h: p for p, h in self._hash.items()} != self._page:
            raise AssertionError("the prefix cache's hash -> page and page -> hash tables disagree")
        idle = {p for p in self._hash if refcount[p] == 0}
        if set(self._evictable) != idle:
            raise AssertionError(
                f"evictable pages {sorted(self._evictable)} are not the cached pages nobody holds "
                f"{sorted(idle)}"
            )


def stats(cache: PrefixCache | None) -> dict:
    """``Engine.stats``'s prefix-cache entries for ``cache`` (None: caching is off): whether it is
    on, lookups, their tokens, the tokens found cached, the hit rate (found over looked-up
    tokens), the pages in the table and the evictions."""
    c = cache if cache is not None else PrefixCache()
    return dict(
        prefix_caching=cache is not None,
        prefix_cache_queries=c.queries,
        prefix_cache_query_tokens=c.query_tokens,
        prefix_cache_hit_tokens=c.hit_tokens,
        prefix_cache_hit_rate=c.hit_tokens / c.query_tokens if c.query_tokens else 0.0,
        prefix_cache_pages=len(c),
        prefix_cache_evictions=c.evictions,
    )
