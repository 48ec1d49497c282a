"""The block manager: which pages of the paged cache each sequence owns (host side, no arrays).

Pages are handed out on demand as sequences grow and return to the free list when the last
sequence holding them finishes. Sequences may share pages (parallel samples of one prompt
share the prompt's pages): each page has a reference count, and a sequence about to write
into a page it shares first gets a private copy (copy-on-write). Page ``TRASH_PAGE`` (0) is
never handed out: padding tokens write there.
"""

from __future__ import annotations

import numpy as np

from kernels_pallas.intmath import cdiv
from llmarch.checks import check_positive
from llmarch.layers.paged import TRASH_PAGE


class OutOfPages(RuntimeError):
    """Not enough free pages for an allocation; nothing was changed."""


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold ``num_tokens`` tokens."""
    return cdiv(num_tokens, page_size)


class BlockManager:
    """Reference-counted pages ``1..num_pages-1`` of a pool of ``num_pages`` (0 is the trash page).

    A block table is a plain ``list[int]`` of page ids owned by its sequence; the manager
    mutates it in ``prepare_write`` and ``release``.
    """

    def __init__(self, num_pages: int, page_size: int):
        check_positive("", num_pages=num_pages, page_size=page_size)
        if num_pages < 2:
            raise ValueError(
                f"num_pages={num_pages} is invalid: must be >= 2 (page {TRASH_PAGE} is reserved for padding)"
            )
        self.num_pages, self.page_size = num_pages, page_size
        self.refcount = np.zeros(num_pages, np.int64)
        self.refcount[TRASH_PAGE] = 1  # reserved forever
        self._free = list(range(num_pages - 1, 0, -1))  # a stack: low page ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages that sequences can use (all but the trash page)."""
        return self.num_pages - 1

    def _allocate(self) -> int:
        page = self._free.pop()
        self.refcount[page] = 1
        return page

    def share(self, table: list[int]) -> list[int]:
        """A new block table holding the same pages (each page's count goes up by one)."""
        for page in table:
            self.refcount[page] += 1
        return list(table)

    def release(self, table: list[int]) -> None:
        """Drops ``table``'s hold on its pages (emptying it); pages nobody holds are freed."""
        for page in table:
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                self._free.append(page)
            elif self.refcount[page] < 0:
                raise RuntimeError(f"page {page} was released more often than it was held")
        table.clear()

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
        if sorted(self._free) != np.flatnonzero(counts == 0).tolist():
            raise AssertionError("the free list is not exactly the pages nobody holds")
