# SPDX-License-Identifier: Apache-2.0
"""Bookkeeping of the sphkv pool: logical pages → (tier, physical page) or a dense staging slot.

SGLang's allocator hands out *logical* pages (``slot // page_size``). A logical page is in one of
four states:

* free        — ``stage_of == -1`` and ``tier_of == -1``;
* staging     — being filled: its tokens live densely in staging slot ``stage_of``;
* pending     — full, coded during the current forward, staging slot still held until the last
  layer has been coded (readers use the staging copy while ``stage_of >= 0``);
* coded       — ``tier_of = t`` and ``phys_of = i``: page ``i`` of tier ``t``'s arena.

Page 0 is SGLang's padding page and is never tracked. All free lists are LIFO Python lists; the
tables are CPU tensors (the GPU path would mirror ``tier_of``/``phys_of`` on the device).
"""
from __future__ import annotations

import torch

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
        self.reset()

    def reset(self) -> None:
        """Everything free (SGLang's allocator ``clear()``)."""
        self.tier_of.fill_(-1)
        self.phys_of.fill_(-1)
        self.stage_of.fill_(-1)
        self.written.zero_()
        self.free_phys = [list(range(n - 1, -1, -1)) for n in self.phys_pages]
        self.free_stage = list(range(self.num_staging - 1, -1, -1))
        self.owner = [torch.full((n,), -1, dtype=torch.int64) for n in self.phys_pages]  # phys → logical

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
        slots = [self.free_stage.pop() for _ in range(need.numel())]
        self.stage_of[need] = torch.tensor(slots, dtype=torch.int32)

    def mark_written(self, pages: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Record writes of ``(page, offset)`` pairs; return the pages that became full (sorted, unique)."""
        was_full = self.written[pages].all(-1)
        self.written[pages, offsets] = True
        uniq = torch.unique(pages[~was_full])
        return uniq[self.written[uniq].all(-1)]

    # -- coding --------------------------------------------------------------------------------
    def free_count(self, tier: int) -> int:
        return len(self.free_phys[tier])

    def assign(self, page: int, *, tier: int) -> int:
        """Give full ``page`` a physical page of ``tier``; return its index."""
        if not self.free_phys[tier]:
            raise PageTableError(f"tier {tier} has no free physical page")
        phys = self.free_phys[tier].pop()
        self.tier_of[page], self.phys_of[page] = tier, phys
        self.owner[tier][phys] = page
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
        self.owner[tier][phys] = -1
        self.free_phys[tier].append(phys)

    def finish_pending(self, pages: torch.Tensor) -> None:
        """Release the staging slots of ``pages`` whose coded copies are complete."""
        for p in pages.tolist():
            s = int(self.stage_of[p])
            if s >= 0:
                self.free_stage.append(s)
                self.stage_of[p] = -1

    # -- free ------------------------------------------------------------------------------------
    def release(self, pages: torch.Tensor) -> None:
        """SGLang freed ``pages``: return their staging slots and physical pages."""
        pages = pages[(pages > 0) & (pages < self.num_pages)]
        for p in pages.tolist():
            s, t = int(self.stage_of[p]), int(self.tier_of[p])
            if s >= 0:
                self.free_stage.append(s)
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
                "free_phys": [len(f) for f in self.free_phys], "phys": list(self.phys_pages)}

    def check(self) -> None:
        """Assert every invariant (free lists disjoint from live pages, owners consistent)."""
        for t, free in enumerate(self.free_phys):
            live = (self.tier_of == t).nonzero().flatten()
            used = set(self.phys_of[live].tolist())
            assert len(used) == live.numel(), f"tier {t}: two pages share a physical page"
            assert not used & set(free), f"tier {t}: a live physical page is on the free list"
            assert len(used) + len(free) == self.phys_pages[t], f"tier {t}: physical pages leaked"
            assert len(set(free)) == len(free), f"tier {t}: free list has duplicates"
            for p, ph in zip(live.tolist(), self.phys_of[live].tolist()):
                assert int(self.owner[t][ph]) == p, f"tier {t}: owner of physical page {ph} is wrong"
        staged = self.stage_of[self.stage_of >= 0].tolist()
        assert len(set(staged)) == len(staged), "two pages share a staging slot"
        assert not set(staged) & set(self.free_stage), "a used staging slot is on the free list"
        assert len(staged) + len(self.free_stage) == self.num_staging, "staging slots leaked"
