"""The block manager: which pages of the paged cache each sequence owns (host side, no arrays).

Pages are handed out on demand as sequences grow and return to the free list when the last
sequence holding them finishes. Sequences may share pages (parallel samples of one prompt
share the prompt's pages): each page has a reference count, and a sequence about to write
into a page it shares first gets a private copy (copy-on-write). Page ``TRASH_PAGE`` (0) is
never handed out: padding tokens write there.

With prefix caching (``llmarch.inference.prefix_cache``), full pages of computed tokens are also
entered in a table by the hash of their prefix (``cache_page``); a new sequence starts from the
cached pages of its prefix (``lookup`` then ``take``). A cached page that nobody holds any more is
kept, evictable, and counts as free: allocation takes never-cached free pages first, then evicts
the least recently released cached page.
"""

from __future__ import annotations

import numpy as np

from kernels_pallas.intmath import cdiv
from llmarch.checks import check_positive
from llmarch.inference.prefix_cache import PrefixCache
from llmarch.layers.paged import TRASH_PAGE


class OutOfPages(RuntimeError):
    """Not enough free pages for an allocation; nothing was changed."""


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold ``num_tokens`` tokens."""
    return cdiv(num_tokens, page_size)


class BlockManager:
    """Reference-counted pages ``1..num_pages-1`` of a pool of ``num_pages`` (0 is the trash page).

    A block table is a plain ``list[int]`` of page ids owned by its sequence; the manager
    mutates it in ``prepare_write`` and ``release``. ``prefix_caching``: keep full computed pages
    for reuse (``cache``, a ``PrefixCache``; None when off).
    """

    def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = False):
        check_positive("", num_pages=num_pages, page_size=page_size)
        if num_pages < 2:
            raise ValueError(
                f"num_pages={num_pages} is invalid: must be >= 2 (page {TRASH_PAGE} is reserved for padding)"
            )
        self.num_pages, self.page_size = num_pages, page_size
        self.refcount = np.zeros(num_pages, np.int64)
        self.refcount[TRASH_PAGE] = 1  # reserved forever
        self._free = list(range(num_pages - 1, 0, -1))  # a stack: low page ids first; never cached
        self.cache = PrefixCache() if prefix_caching else None

    @property
    def num_free(self) -> int:
        """Pages an allocation can take: free ones and evictable cached ones."""
        return len(self._free) + (self.cache.num_evictable if self.cache is not None else 0)

    @property
    def capacity(self) -> int:
        """Pages that sequences can use (all but the trash page)."""
        return self.num_pages - 1

    def _allocate(self) -> int:
        page = self._free.pop() if self._free else self.cache.evict()  # callers checked num_free
        self.refcount[page] = 1
        return page

    def share(self, table: list[int]) -> list[int]:
        """A new block table holding the same pages (each page's count goes up by one)."""
        for page in table:
            self.refcount[page] += 1
        return list(table)

    def release(self, table: list[int]) -> None:
        """Drops ``table``'s hold on its pages (emptying it); pages nobody holds are freed, or,
        when cached, become evictable. The table's last pages are released first, so they are
        evicted first: a longer prefix is less likely to be asked for again than a shorter one."""
        for page in reversed(table):
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                if self.cache is not None and self.cache.is_cached(page):
                    self.cache.park(page)
                else:
                    self._free.append(page)
            elif self.refcount[page] < 0:
                raise RuntimeError(f"page {page} was released more often than it was held")
        table.clear()

    # Prefix caching ----------------------------------------------------------------------

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached pages of the longest prefix of ``hashes`` (nothing taken; [] when off)."""
        return [] if self.cache is None else self.cache.lookup(hashes)

    def pages_revived(self, pages: list[int]) -> int:
        """Free (evictable) pages that ``take(pages)`` would take out of ``num_free``."""
        return sum(1 for page in pages if self.refcount[page] == 0)

    def take(self, pages: list[int]) -> list[int]:
        """A new block table holding the cached ``pages`` (from ``lookup``): held pages are
        shared, evictable ones held again."""
        for page in pages:
            if self.refcount[page] == 0:
                self.cache.unpark(page)
            self.refcount[page] += 1
        return list(pages)

    def cache_page(self, page: int, h: bytes) -> None:
        """Enters ``page`` (held, full of computed tokens whose prefix hashes to ``h``) in the
        table; no-op when caching is off or ``h`` is cached as another page already."""
        if self.cache is not None:
            if self.refcount[page] <= 0:
                raise RuntimeError(f"page {page} is cached while nobody holds it")
            self.cache.add(page, h)

    def pages_to_write(self, table: list[int], start: int, end: int) -> int:
        """Free pages that ``prepare_write(table, start, end)`` would take."""
        new = max(0, pages_for(end, self.page_size) - len(table))
        first, last = start // self.page_size, min((end - 1) // self.page_size, len(table) - 1)
        shared = sum(1 for j in range(first, last + 1) if self.refcount[table[j]] > 1)
        return new + shared

    def prepare_write(self, table: list[int], start: int, end: int) -> list[tuple[int, int]]:
        """Makes ``table`` own private pages for positions ``[start, end)``.

        Appends pages until ``end`` fits, and replaces each shared page the range touches by a
        fresh one (copy-on-write). Returns the ``(src, dst)`` page copies to apply to the cache
        before the write.

        Raises:
          OutOfPages: when there are not enough free pages; ``table`` is then unchanged.
        """
        if not 0 <= start < end:
            raise ValueError(f"positions [{start}, {end}) are not a non-empty range")
        needed = self.pages_to_write(table, start, end)
        if needed > self.num_free:
            raise OutOfPages(f"{needed} pages needed, {self.num_free} free")
        copies = []
        first, last = start // self.page_size, min((end - 1) // self.page_size, len(table) - 1)
        for j in range(first, last + 1):
            if self.refcount[table[j]] > 1:
                new = self._allocate()
                self.refcount[table[j]] -= 1
                copies.append((table[j], new))
                table[j] = new
        while len(table) < pages_for(end, self.page_size):
            table.append(self._allocate())
        return copies

    def check(self, tables: list[list[int]]) -> None:
        """Asserts that reference counts equal the holds in ``tables`` (a test helper)."""
        counts = np.zeros(self.num_pages, np.int64)
        counts[TRASH_PAGE] = 1
        for table in tables:
            for page in table:
                counts[page] += 1
        if not np.array_equal(counts, self.refcount):
            bad = np.flatnonzero(counts != self.refcount)
            raise AssertionError(
                f"refcounts differ at pages {bad.tolist()}: held {counts[bad].tolist()}, "
                f"counted {self.refcount[bad].tolist()}"
            )
        idle = self._free + (self.cache.evictable_pages() if self.cache is not None else [])
        if sorted(idle) != np.flatnonzero(counts == 0).tolist():
            raise AssertionError("the free and evictable pages are not exactly the pages nobody holds")
        if self.cache is not None:
            if any(self.cache.is_cached(page) for page in self._free):
                raise AssertionError("a cached page is on the free list (it should be evictable)")
            self.cache.check(self.refcount)
