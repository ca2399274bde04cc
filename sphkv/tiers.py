# SPDX-License-Identifier: Apache-2.0
"""Precision tiers: the ordered set of (key codec, value codec) pairs a token may be kept at.

Tier 0 is the most precise. ``DENSE`` keeps bf16 keys and values; a coded tier names a
:class:`SphKVConfig`. Dropping is not a tier: it is the absence of a page.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import SphKVConfig
from .keys import AngleKeyCodec
from .values import GroupValueQuantizer

__all__ = ["Tier", "TierSet", "PAGE_META_BYTES"]

# Per page per (layer, kv head): tier tag (1 B), token count (2 B), pad (1 B), first position (4 B).
PAGE_META_BYTES = 8


@dataclass(frozen=True)
class Tier:
    """One precision tier. ``config=None`` means dense bf16 keys and values."""

    name: str
    config: SphKVConfig | None = None

    @property
    def dense(self) -> bool:
        return self.config is None

    def page_bytes(self, head_dim: int, page_size: int) -> int:
        """Exact bytes of one full page of this tier for one (layer, kv head), metadata included."""
        if self.config is None:
            return page_size * head_dim * 2 * 2 + PAGE_META_BYTES
        k = AngleKeyCodec(self.config).stored_bytes(page_size)
        v = GroupValueQuantizer(self.config).stored_bytes(page_size)
        return k + v + PAGE_META_BYTES

    def bytes_per_token(self, head_dim: int, page_size: int) -> float:
        return self.page_bytes(head_dim, page_size) / page_size


@dataclass(frozen=True)
class TierSet:
    """Ordered tiers, most precise first; all share head_dim and page_size."""

    tiers: tuple[Tier, ...]
    head_dim: int = 64
    page_size: int = 64
    distortion: tuple[float, ...] = field(default=())   # calibrated per tier (0 for dense), set by calibration

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError("tiers must name at least one tier")
        for t in self.tiers:
            if t.config is not None and (t.config.head_dim, t.config.page_size) != (self.head_dim, self.page_size):
                raise ValueError(f"tier {t.name!r} has head_dim/page_size {t.config.head_dim}/{t.config.page_size}; "
                                 f"the set uses {self.head_dim}/{self.page_size}")
        if self.distortion and len(self.distortion) != len(self.tiers):
            raise ValueError(f"distortion has {len(self.distortion)} entries for {len(self.tiers)} tiers")

    def __len__(self) -> int:
        return len(self.tiers)

    def page_bytes(self) -> list[int]:
        return [t.page_bytes(self.head_dim, self.page_size) for t in self.tiers]

    @classmethod
    def default(cls, head_dim: int = 64, page_size: int = 64) -> "TierSet":
        """``dense`` > ``sphkv-4`` > ``sphkv-2``."""
        mk = lambda n: Tier(n, SphKVConfig.from_name(n, head_dim=head_dim, page_size=page_size))  # noqa: E731
        return cls((Tier("dense"), mk("sphkv-4"), mk("sphkv-2")), head_dim=head_dim, page_size=page_size)
