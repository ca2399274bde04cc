# SPDX-License-Identifier: Apache-2.0
"""Bookkeeping of the sphkv pool: logical pages → (tier, physical page) or a dense staging slot.

SGLang's allocator hands out *logical* pages (``slot // page_size``). A logical page is in one of
four states:

* free        — ``stage_of == -1`` and ``tier_of == -1``;
* staging     — being filled: its tokens live densely in staging slot ``stage_of``;
* pending     — full, coded during the current forward, staging slot still held until the last
  layer has been coded (readers use the staging copy while ``stage_of >= 0``);
* coded       — ``tier_of = t`` and ``phys_of = i``: page ``i`` of tier ``t``'s arena.

Page 0 is SGLang's padding page and is never tracked. Physical pages and staging slots are handed
out and freed through :class:`sphkv.pages.PageLists` (the allocator of the core paged store too):
``phys`` (one list per tier, owner = logical page) and ``slots`` (one list, owner = logical page);
their ``on_free`` hooks are where debug poisoning goes. The tables are CPU tensors (the GPU path
mirrors ``tier_of``/``phys_of``/``stage_of`` on the device).
"""
from __future__ import annotations

import torch

from sphkv.pages.lists import PageLists

__all__ = ["PageTable", "PageTableError"]


class PageTableError(RuntimeError):
    """An impossible page state was requested (a bug in the caller, never silently ignored)."""


class PageTable:
    """State of ``num_pages`` logical pages (index 0 = padding) over tiered arenas and staging.

    Parameters
    ----------
    num_pages : logical pages including the padding page 0.
    phys_pages : physical pages per tier, most precise tier first.
    staging_pages : dense staging slots.
    page_size : tokens per page.

    Examples
    --------
    >>> pt = PageTable(num_pages=5, phys_pages=(2, 2), staging_pages=2, page_size=4)
    >>> pt.stage(torch.tensor([1]))
    >>> pt.mark_written(torch.tensor([1, 1, 1, 1]), torch.tensor([0, 1, 2, 3])).tolist()
    [1]
    >>> pt.assign(1, tier=0)
    0
    >>> pt.finish_pending(torch.tensor([1])); pt.counts()["coded"]
    [1, 0]
    >>> pt.release(torch.tensor([1])); pt.check()
    """

    def __init__(self, *, num_pages: int, phys_pages: tuple[int, ...], staging_pages: int, page_size: int):
        if num_pages < 2 or staging_pages < 1 or not phys_pages or min(phys_pages) < 0:
            raise ValueError(f"bad page table shape: num_pages={num_pages}, phys_pages={phys_pages}, "
                             f"staging_pages={staging_pages}")
        self.num_pages, self.phys_pages, self.num_staging, self.page_size = \
            num_pages, tuple(phys_pages), staging_pages, page_size
        self.tier_of = torch.full((num_pages,), -1, dtype=torch.int8)
        self.phys_of = torch.full((num_pages,), -1, dtype=torch.int32)
        self.stage_of = torch.full((num_pages,), -1, dtype=torch.int32)
        self.written = torch.zeros(num_pages, page_size, dtype=torch.bool)
        self.phys = PageLists(self.phys_pages)                 # physical pages per tier, owner = logical page
        self.slots = PageLists([staging_pages])                # dense staging slots, owner = logical page
        self.reset()

    def reset(self) -> None:
        """Everything free (SGLang's allocator ``clear()``)."""
        self.tier_of.fill_(-1)
        self.phys_of.fill_(-1)
        self.stage_of.fill_(-1)
        self.written.zero_()
        self.phys.reset()
        self.slots.reset()

    @property
    def free_stage(self) -> list[int]:
        """The free staging slots (read only; a LIFO list)."""
        return self.slots.free[0]

    # -- staging -------------------------------------------------------------------------------
    def stage(self, pages: torch.Tensor) -> None:
        """Give each of ``pages`` (int64 [n], not coded) a staging slot if it has none."""
        need = pages[self.stage_of[pages] < 0]
        if need.numel() == 0:
            return
        coded = need[self.tier_of[need] >= 0]
        if coded.numel():
            raise PageTableError(f"write into coded page(s) {coded.tolist()[:8]}: a page is written once "
                                 "between allocation and free")
        if need.numel() > len(self.free_stage):
            raise PageTableError(f"staging exhausted: {need.numel()} page(s) need a dense slot, "
                                 f"{len(self.free_stage)} of {self.num_staging} free; raise staging_pages "
                                 "(--sphkv-config) or lower --max-running-requests")
        slots = [self.slots.take(0, 1, p)[0] for p in need.tolist()]
        self.stage_of[need] = torch.tensor(slots, dtype=torch.int32)

    def mark_written(self, pages: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Record writes of ``(page, offset)`` pairs; return the pages that became full (sorted, unique)."""
        was_full = self.written[pages].all(-1)
        self.written[pages, offsets] = True
        uniq = torch.unique(pages[~was_full])
        return uniq[self.written[uniq].all(-1)]

    # -- coding --------------------------------------------------------------------------------
    def free_count(self, tier: int) -> int:
        return self.phys.free_count(tier)

    def assign(self, page: int, *, tier: int) -> int:
        """Give full ``page`` a physical page of ``tier``; return its index."""
        if not self.phys.free_count(tier):
            raise PageTableError(f"tier {tier} has no free physical page")
        phys = self.phys.take(tier, 1, int(page))[0]
        self.tier_of[page], self.phys_of[page] = tier, phys
        return phys

    def move(self, page: int, *, tier: int) -> tuple[int, int, int]:
        """Move coded ``page`` to ``tier`` (demotion); return ``(old_tier, old_phys, new_phys)``.

        The old physical page is freed after the caller re-encoded it (call :meth:`free_phys_page`).
        """
        old_t, old_p = int(self.tier_of[page]), int(self.phys_of[page])
        if old_t < 0 or int(self.stage_of[page]) >= 0:
            raise PageTableError(f"page {page} is not coded (tier {old_t}); only coded pages move")
        new_p = self.assign(page, tier=tier)
        return old_t, old_p, new_p

    def free_phys_page(self, tier: int, phys: int) -> None:
        self.phys.release(tier, phys)

    def finish_pending(self, pages: torch.Tensor) -> None:
        """Release the staging slots of ``pages`` whose coded copies are complete."""
        for p in pages.tolist():
            s = int(self.stage_of[p])
            if s >= 0:
                self.stage_of[p] = -1
                self.slots.release(0, s)

    # -- free ------------------------------------------------------------------------------------
    def release(self, pages: torch.Tensor) -> None:
        """SGLang freed ``pages``: return their staging slots and physical pages."""
        pages = pages[(pages > 0) & (pages < self.num_pages)]
        for p in pages.tolist():
            s, t = int(self.stage_of[p]), int(self.tier_of[p])
            if s >= 0:
                self.slots.release(0, s)
            if t >= 0:
                self.free_phys_page(t, int(self.phys_of[p]))
        self.stage_of[pages] = -1
        self.tier_of[pages] = -1
        self.phys_of[pages] = -1
        self.written[pages] = False

    # -- accounting ------------------------------------------------------------------------------
    def counts(self) -> dict:
        coded = [int((self.tier_of == t).sum()) for t in range(len(self.phys_pages))]
        return {"coded": coded, "staging": self.num_staging - len(self.free_stage),
                "free_phys": [self.phys.free_count(t) for t in range(len(self.phys_pages))],
                "phys": list(self.phys_pages)}

    def check(self) -> None:
        """Assert every invariant (free lists disjoint from live pages, owners consistent)."""
        for t in range(len(self.phys_pages)):
            live = (self.tier_of == t).nonzero().flatten().tolist()
            phys = self.phys_of[live].tolist()
            assert len(set(phys)) == len(phys), f"tier {t}: two pages share a physical page"
            self.phys.check(t, dict(zip(phys, live)))
        staged = (self.stage_of >= 0).nonzero().flatten().tolist()
        slots = self.stage_of[staged].tolist()
        assert len(set(slots)) == len(slots), "two pages share a staging slot"
        self.slots.check(0, dict(zip(slots, staged)))
