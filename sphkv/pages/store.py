# SPDX-License-Identifier: Apache-2.0
"""Tier-homogeneous paged KV store: per (layer, kv head) a list of pages, each of one tier.

One page arena per tier (``sphkv.pool.TierPool`` or ``sphkv.gridquant.GridTierPool``), its pages
handed out and freed through :class:`sphkv.pages.lists.PageLists` (LIFO free lists, an owner per
page, poisoning on free); page 0 of every arena is the padding page and is never handed out. A page
holds 1..P tokens of one (layer, kv head), all of one tier, in ascending original position.

Byte accounting (:class:`StoreBytes`): a page in use costs its tier's full ``page_bytes``
(partial pages reserve a whole page in the arena): arena bytes (codes, radii, means, scales)
plus ``PAGE_META_BYTES`` of device metadata (tier tag, token count, first position). The
per-token original positions are kept host-side as one int32 tensor per page — the decode
kernels never read them (keys are stored after RoPE) — and are reported separately.

Demotion and compaction of coded pages decode and re-encode (page means change), which adds a
little error; dense pages move losslessly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tiers import PAGE_META_BYTES, TierSet
from .arenas import kind_of, make_arena, poison_page
from .lists import OutOfPagesError, PageError, PageLists

__all__ = ["PageMeta", "PagedStore", "StoreBytes", "OutOfPagesError", "PageError"]


@dataclass(frozen=True, eq=False)
class PageMeta:
    """One page: ``tier`` index in the TierSet, ``page`` id in that tier's arena, ``positions`` ``[n]`` int32."""

    tier: int
    page: int
    positions: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.positions.numel())


@dataclass(frozen=True)
class StoreBytes:
    """Exact bytes of the pages in use (see the module docstring)."""

    pages: tuple[int, ...]
    tokens: tuple[int, ...]
    arena_bytes: int
    metadata_bytes: int
    position_bytes: int

    @property
    def stored_bytes(self) -> int:
        return self.arena_bytes + self.metadata_bytes

    @property
    def metadata_overhead(self) -> float:
        """Device metadata ÷ stored bytes."""
        return self.metadata_bytes / max(self.stored_bytes, 1)

    @property
    def position_overhead(self) -> float:
        """Host-side position index ÷ stored bytes."""
        return self.position_bytes / max(self.stored_bytes, 1)

    def as_dict(self) -> dict:
        return dict(pages=list(self.pages), tokens=list(self.tokens), arena_bytes=self.arena_bytes,
                    metadata_bytes=self.metadata_bytes, stored_bytes=self.stored_bytes,
                    position_index_bytes=self.position_bytes, metadata_overhead=self.metadata_overhead,
                    position_index_overhead=self.position_overhead)


class PagedStore:
    """Pages of ``num_layers × num_kv_heads`` heads over one arena per tier of ``tierset``.

    Parameters
    ----------
    tierset : the tiers, most precise first (``Tier`` or ``GridTier`` entries).
    num_pages : usable pages per tier (int for all tiers, or one per tier); each arena gets one more (page 0).
    debug : poison freed pages (NaN floats, 0xFF codes) so a read of a stale page id yields NaN.

    Examples
    --------
    >>> from sphkv.tiers import TierSet
    >>> store = PagedStore(TierSet.default(page_size=16), 8, num_layers=1, num_kv_heads=1)
    >>> k, v = torch.randn(40, 64), torch.randn(40, 64)
    >>> [m.count for m in store.write(0, 0, 1, k, v, torch.arange(40))]
    [16, 16, 8]
    >>> store.compact(), store.bytes().pages
    (0, (0, 3, 0))
    """

    def __init__(self, tierset: TierSet, num_pages, *, num_layers: int, num_kv_heads: int,
                 device="cpu", debug: bool = False):
        counts = [num_pages] * len(tierset) if isinstance(num_pages, int) else list(num_pages)
        if len(counts) != len(tierset) or any(c < 0 for c in counts):
            raise ValueError(f"num_pages={num_pages!r} must be a non-negative int or one per tier ({len(tierset)})")
        if num_layers < 1 or num_kv_heads < 1:
            raise ValueError(f"num_layers={num_layers!r} and num_kv_heads={num_kv_heads!r} must be >= 1")
        self.tierset, self.debug = tierset, debug
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.page_size, self.head_dim = tierset.page_size, tierset.head_dim
        self.page_bytes = tierset.page_bytes()
        self.arenas = [make_arena(t, c + 1, head_dim=self.head_dim, page_size=self.page_size, device=device)
                       for t, c in zip(tierset.tiers, counts)]
        self.lists = PageLists(counts, first=1)                          # page 0 of each arena: padding
        if debug:
            self.lists.on_free = lambda tier, page: poison_page(self.arenas[tier], page)
        self._tables: dict[tuple[int, int], list[PageMeta]] = {
            (l, h): [] for l in range(num_layers) for h in range(num_kv_heads)}

    # -- pages ---------------------------------------------------------------------------------------
    def capacity(self, tier: int) -> int:
        return self.arenas[tier].num_pages - 1

    def free_pages(self, tier: int) -> int:
        return self.lists.free_count(tier)

    def pages(self, layer: int, head: int) -> tuple[PageMeta, ...]:
        return tuple(self._table(layer, head))

    def _table(self, layer: int, head: int) -> list[PageMeta]:
        if (layer, head) not in self._tables:
            raise ValueError(f"(layer, head)=({layer}, {head}) is out of range "
                             f"({self.num_layers} layers × {self.num_kv_heads} kv heads)")
        return self._tables[(layer, head)]

    def _check_owned(self, layer: int, head: int, meta: PageMeta) -> None:
        if not any(m is meta for m in self._table(layer, head)):
            raise PageError(f"page {meta.page} of tier {meta.tier} is not a live page of (layer, head)="
                            f"({layer}, {head}) (freed, demoted, compacted, or never written there)")

    def _take(self, tier: int, n: int, owner: tuple[int, int]) -> list[int]:
        if n > self.lists.free_count(tier):
            raise OutOfPagesError(f"tier {self.tierset.tiers[tier].name!r} needs {n} pages, "
                                  f"{self.lists.free_count(tier)} of {self.capacity(tier)} free")
        return self.lists.take(tier, n, owner)

    # -- write / read --------------------------------------------------------------------------------
    def write(self, layer: int, head: int, tier: int, k: torch.Tensor, v: torch.Tensor,
              positions: torch.Tensor) -> list[PageMeta]:
        """Store tokens ``k``, ``v`` ``[n, d]`` at original ``positions`` ``[n]`` (distinct) in new pages of ``tier``.

        Tokens are sorted by position and packed ``page_size`` to a page; all-or-nothing on
        :class:`OutOfPagesError`. Returns the new pages.
        """
        table = self._table(layer, head)
        if not 0 <= tier < len(self.tierset):
            raise ValueError(f"tier={tier!r} is out of range 0..{len(self.tierset) - 1}")
        n = int(positions.numel())
        if n == 0:
            return []
        if k.shape != (n, self.head_dim) or v.shape != (n, self.head_dim):
            raise ValueError(f"k, v must be [{n}, {self.head_dim}], got {tuple(k.shape)}, {tuple(v.shape)}")
        pos, order = positions.to(torch.int64).cpu().sort()
        if n > 1 and bool((pos[1:] == pos[:-1]).any()):
            raise ValueError("positions must be distinct")
        order = order.to(k.device)
        p = self.page_size
        ids = self._take(tier, -(-n // p), (layer, head))
        kind_of(self.tierset.tiers[tier]).write(self.arenas[tier], torch.tensor(ids), k[order], v[order])
        new = [PageMeta(tier, pid, pos[i * p:(i + 1) * p].to(torch.int32)) for i, pid in enumerate(ids)]
        table.extend(new)
        return new

    def write_plan(self, layer: int, k: torch.Tensor, v: torch.Tensor, tiers: torch.Tensor) -> None:
        """Store one layer by plan: ``k``, ``v`` ``[Hkv, N, d]`` (or ``[1, Hkv, N, d]``), ``tiers`` ``[Hkv, N]`` int.

        Token ``i`` of head ``h`` goes to tier ``tiers[h, i]``; values ``>= len(tierset)`` mean drop.
        """
        if k.dim() == 4:
            k, v = k[0], v[0]
        for h in range(k.shape[0]):
            for t in range(len(self.tierset)):
                idx = (tiers[h] == t).nonzero().flatten().cpu()
                if idx.numel():
                    self.write(layer, h, t, k[h, idx.to(k.device)], v[h, idx.to(v.device)], idx)

    def decode(self, layer: int, head: int, meta: PageMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """Page ``meta`` → ``(k, v)`` ``[count, d]`` float32; raises :class:`PageError` on a stale page."""
        self._check_owned(layer, head, meta)
        kind = kind_of(self.tierset.tiers[meta.tier])
        return kind.decode(self.arenas[meta.tier], torch.tensor([meta.page]), torch.tensor([meta.count]))

    def gather(self, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All stored tokens of a head, decoded and sorted by position.

        Returns ``(positions [n] int64, k [n, d] float32, v [n, d] float32, tier [n] int64)``.
        """
        metas = self._table(layer, head)
        if not metas:
            e = torch.empty(0, self.head_dim)
            return torch.empty(0, dtype=torch.int64), e, e.clone(), torch.empty(0, dtype=torch.int64)
        ks, vs = zip(*(self.decode(layer, head, m) for m in metas))
        pos = torch.cat([m.positions.to(torch.int64) for m in metas])
        tier = torch.cat([torch.full((m.count,), m.tier, dtype=torch.int64) for m in metas])
        order = pos.argsort()
        return pos[order], torch.cat(ks)[order], torch.cat(vs)[order], tier[order]

    # -- free / demote / compact ---------------------------------------------------------------------
    def free(self, layer: int, head: int, meta: PageMeta) -> None:
        """Return page ``meta`` to its arena's free list (poisoned in debug mode)."""
        self._check_owned(layer, head, meta)
        table = self._table(layer, head)
        table.pop(next(i for i, m in enumerate(table) if m is meta))
        self.lists.release(meta.tier, meta.page)

    def flush(self, layer: int | None = None, head: int | None = None) -> int:
        """Free every page (of one layer and/or head when given); returns the number of pages freed."""
        freed = 0
        for (l, h), table in self._tables.items():
            if (layer is None or l == layer) and (head is None or h == head):
                for m in list(table):
                    self.free(l, h, m)
                    freed += 1
        return freed

    def demote(self, layer: int, head: int, meta: PageMeta, to_tier: int) -> list[PageMeta]:
        """Move page ``meta`` to the lower tier ``to_tier`` (decode, re-encode, free the old page)."""
        self._check_owned(layer, head, meta)
        if not meta.tier < to_tier < len(self.tierset):
            raise ValueError(f"to_tier={to_tier!r} must be a lower tier than {meta.tier} (allowed: "
                             f"{meta.tier + 1}..{len(self.tierset) - 1})")
        k, v = self.decode(layer, head, meta)
        new = self.write(layer, head, to_tier, k, v, meta.positions)
        self.free(layer, head, meta)
        return new

    def compact(self, layer: int | None = None, head: int | None = None) -> int:
        """Merge the partial pages of each (layer, head, tier); returns the number of pages freed."""
        freed = 0
        for (l, h), table in self._tables.items():
            if (layer is not None and l != layer) or (head is not None and h != head):
                continue
            for t in range(len(self.tierset)):
                partial = [m for m in table if m.tier == t and m.count < self.page_size]
                if len(partial) < 2:
                    continue
                ks, vs = zip(*(self.decode(l, h, m) for m in partial))
                pos = torch.cat([m.positions for m in partial])
                for m in partial:
                    self.free(l, h, m)
                freed += len(partial) - len(self.write(l, h, t, torch.cat(ks), torch.cat(vs), pos))
        return freed

    # -- accounting ----------------------------------------------------------------------------------
    def bytes(self) -> StoreBytes:
        """Exact bytes of the pages in use."""
        nt = len(self.tierset)
        pages, tokens = [0] * nt, [0] * nt
        for table in self._tables.values():
            for m in table:
                pages[m.tier] += 1
                tokens[m.tier] += m.count
        arena = sum(p * (b - PAGE_META_BYTES) for p, b in zip(pages, self.page_bytes))
        return StoreBytes(tuple(pages), tuple(tokens), arena, sum(pages) * PAGE_META_BYTES, 4 * sum(tokens))

    def bytes_per_head(self) -> torch.Tensor:
        """Stored bytes ``[num_layers, num_kv_heads]`` int64 (per-layer and per-head budgets as they fell out)."""
        out = torch.zeros(self.num_layers, self.num_kv_heads, dtype=torch.int64)
        for (l, h), table in self._tables.items():
            out[l, h] = sum(self.page_bytes[m.tier] for m in table)
        return out

    def check(self) -> None:
        """Raise ``AssertionError`` unless every page is free xor owned by exactly one live page entry."""
        for t in range(len(self.tierset)):
            live: dict[int, tuple[int, int]] = {}
            for (l, h), table in self._tables.items():
                for m in table:
                    if m.tier == t:
                        assert m.page not in live, f"tier {t}: a page is owned twice"
                        live[m.page] = (l, h)
            self.lists.check(t, live)
