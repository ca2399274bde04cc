# SPDX-License-Identifier: Apache-2.0
"""Decode-time re-planning at page granularity: shrink a live store to a new byte budget.

Tokens already dropped cannot come back and coded tokens cannot be made precise again, so a
re-plan over a live :class:`~sphkv.pages.PagedStore` only moves pages down: demote a page one
tier (decode, re-encode) or free it. Each move costs ``U_page·ΔD`` — the page's utility (the
sum of its tokens' current utility, e.g. :class:`~sphkv.retention.AttentionMassTracker`) times
the distortion step (drop = 1) — and saves ``Δbytes``; the cheapest ``ΔD`` per byte saved goes
first until the store fits. Pages holding a protected position are never touched.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import torch

from ..pages import OutOfPagesError, PagedStore, PageMeta

__all__ = ["ShrinkReport", "shrink_store"]


@dataclass(frozen=True)
class ShrinkReport:
    """What :func:`shrink_store` did: pages demoted and freed, distortion added, bytes before and after."""

    demoted: int
    freed: int
    added_distortion: float
    bytes_before: int
    bytes_after: int


def _candidates(store: PagedStore, dist: list[float], u: float, meta: PageMeta):
    t, pb = meta.tier, store.page_bytes
    out = [(u * (dist[-1] - dist[t]), pb[t], "free")]
    if t + 1 < len(pb):
        out.append((u * (dist[t + 1] - dist[t]), pb[t] - pb[t + 1], "demote"))
    return out


def shrink_store(store: PagedStore, utility: torch.Tensor, budget_bytes: int, *,
                 protected: torch.Tensor | None = None, drop_distortion: float = 1.0) -> ShrinkReport:
    """Demote or free pages of ``store`` until its stored bytes are ``≤ budget_bytes``.

    Parameters
    ----------
    utility : ``[L, Hkv, P]`` float — current utility per original position (positions ``≥ P`` count 0).
    protected : ``[P]`` bool — positions whose pages must stay as they are.

    Raises
    ------
    ValueError
        when the store's tier set is not calibrated, or the budget cannot be met without touching
        protected pages (the store is left shrunk as far as allowed).

    Examples
    --------
    >>> from sphkv.retention import ada_tierset
    >>> from sphkv.tiers import TierSet
    >>> ts = TierSet(ada_tierset(page_size=16).tiers, page_size=16, distortion=(0.0, 0.02, 0.25, 0.6))
    >>> store = PagedStore(ts, 8, num_layers=1, num_kv_heads=1)
    >>> _ = store.write(0, 0, 0, torch.randn(64, 64), torch.randn(64, 64), torch.arange(64))
    >>> rep = shrink_store(store, torch.rand(1, 1, 64), 10_000)
    >>> rep.bytes_after <= 10_000 < rep.bytes_before
    True
    """
    if not store.tierset.distortion:
        raise ValueError("store.tierset.distortion is empty: calibrate the tiers first (sphkv.retention.calibrate)")
    dist = [float(x) for x in store.tierset.distortion] + [drop_distortion]
    u_all = utility.to(torch.float64).cpu()
    prot = protected.to(torch.bool).cpu() if protected is not None else None
    tick = itertools.count()
    heap, live = [], set()

    def page_utility(l, h, meta):
        pos = meta.positions.to(torch.int64)
        return float(u_all[l, h, pos[pos < u_all.shape[-1]]].sum())

    def push(l, h, meta):
        pos = meta.positions.to(torch.int64)
        if prot is not None and bool(prot[pos[pos < prot.numel()]].any()):
            return
        live.add(id(meta))
        for dd, saved, action in _candidates(store, dist, page_utility(l, h, meta), meta):
            if saved > 0:
                heapq.heappush(heap, (dd / saved, next(tick), dd, action, l, h, meta))

    for l in range(store.num_layers):
        for h in range(store.num_kv_heads):
            for meta in store.pages(l, h):
                push(l, h, meta)
    before = total = store.bytes().stored_bytes
    demoted = freed = 0
    added = 0.0
    while total > budget_bytes and heap:
        _, _, dd, action, l, h, meta = heapq.heappop(heap)
        if id(meta) not in live:
            continue
        if action == "demote":
            try:
                new = store.demote(l, h, meta, meta.tier + 1)
            except OutOfPagesError:
                continue
            demoted += 1
            total -= store.page_bytes[meta.tier] - store.page_bytes[meta.tier + 1] * len(new)
            for m in new:
                push(l, h, m)
        else:
            store.free(l, h, meta)
            freed += 1
            total -= store.page_bytes[meta.tier]
        live.discard(id(meta))
        added += dd
    assert total == store.bytes().stored_bytes
    if total > budget_bytes:
        raise ValueError(f"budget_bytes={budget_bytes!r} cannot be met without touching protected pages "
                         f"(the store now holds {total} bytes)")
    return ShrinkReport(demoted, freed, added, before, total)
