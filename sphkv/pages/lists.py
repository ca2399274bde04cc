# SPDX-License-Identifier: Apache-2.0
"""Free lists of page ids per tier: who owns each page in use, what happens to a page when it is freed.

The one page allocator of the project: :class:`sphkv.pages.PagedStore` (the HF cache's and RDR's store;
owner = ``(layer, kv head)``, page 0 of every arena is padding so ids start at 1) and the SGLang pool's
page table (``sphkv_sglang.page_table.PageTable``; owner = logical page, ids from 0, plus one more list
for its dense staging slots) both hand out, free, poison and check pages through it.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

__all__ = ["PageLists", "OutOfPagesError", "PageError"]


class OutOfPagesError(MemoryError):
    """A tier's arena has fewer free pages than a write needs."""


class PageError(ValueError):
    """A page is used after it was freed, freed twice, or named under the wrong owner."""


class PageLists:
    """LIFO free lists of page ids ``first .. first + counts[t] - 1`` per tier ``t``, with an owner per page in use.

    After :meth:`reset` the lowest id is handed out first. ``on_free(tier, page)``, when set, runs on every
    page freed, before it goes back on its list (debug poisoning).

    Examples
    --------
    >>> pl = PageLists([2, 3], first=1)
    >>> pl.take(1, 2, owner="a"), pl.free_count(1)
    ([1, 2], 1)
    >>> pl.release(1, 2); pl.take(1, 1, owner="b")
    [2]
    >>> pl.check(1, {1: "a", 2: "b"})
    """

    def __init__(self, counts: Sequence[int], *, first: int = 0):
        if not counts or min(counts) < 0:
            raise ValueError(f"counts={list(counts)!r} must name one non-negative count per tier")
        self.counts, self.first = tuple(int(c) for c in counts), int(first)
        self.on_free: Callable[[int, int], None] | None = None
        self.reset()

    def reset(self) -> None:
        """Every page free (no hook runs)."""
        self.free = [list(range(self.first + c - 1, self.first - 1, -1)) for c in self.counts]
        self.owners: list[dict[int, Hashable]] = [{} for _ in self.counts]

    def free_count(self, tier: int) -> int:
        return len(self.free[tier])

    def take(self, tier: int, n: int, owner: Hashable) -> list[int]:
        """``n`` free pages of ``tier`` for ``owner`` (lowest ids first after a reset); all or nothing."""
        free = self.free[tier]
        if n > len(free):
            raise OutOfPagesError(f"tier {tier} needs {n} pages, {len(free)} of {self.counts[tier]} free")
        ids = [free.pop() for _ in range(n)]
        for p in ids:
            self.owners[tier][p] = owner
        return ids

    def owner(self, tier: int, page: int) -> Hashable | None:
        return self.owners[tier].get(page)

    def release(self, tier: int, page: int) -> None:
        """Put ``page`` back on ``tier``'s list (after ``on_free``); a page not in use raises :class:`PageError`."""
        if self.owners[tier].pop(page, None) is None:
            raise PageError(f"page {page} of tier {tier} is freed twice (or was never handed out)")
        if self.on_free is not None:
            self.on_free(tier, page)
        self.free[tier].append(page)

    def check(self, tier: int, live: Mapping[int, Hashable]) -> None:
        """Raise ``AssertionError`` unless the pages in use are exactly ``live`` (page → owner), each page of
        ``tier`` is either free or in use, and no page is on the free list twice."""
        free, owned = self.free[tier], self.owners[tier]
        assert len(set(free)) == len(free), f"tier {tier}: a page is on the free list twice"
        assert not set(free) & set(owned), f"tier {tier}: a page is both free and in use"
        assert set(owned) == set(live), f"tier {tier}: the pages in use and the page table disagree"
        for p, o in live.items():
            assert owned[p] == o, f"tier {tier}: owner of page {p} is {owned[p]!r}, the table says {o!r}"
        everything = set(range(self.first, self.first + self.counts[tier]))
        assert set(free) | set(owned) == everything, f"tier {tier}: pages leaked"
