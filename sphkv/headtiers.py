# SPDX-License-Identifier: Apache-2.0
"""Per-(layer, kv head) tiers under a bits-per-element cap: a few measured heads high, the rest at a base tier.

A :class:`HeadTierPreset` names a base tier and a high tier (presets of :data:`sphkv.config.PRESETS`, with
optional overrides), the dense sink tokens every (layer, kv head) keeps in bf16, and a cap on
``bits_per_element`` (every stored byte: codes, radii, page means, scales, zeros, page metadata, the dense sinks).
:func:`head_tiers` takes a ranking of (layer, kv head) pairs (best first, e.g. retrieval heads measured on a
calibration corpus) and lifts pairs to the high tier in that order while the whole cache stays under the cap at
the given shape; the result is a ``[L, Hkv]`` tier index (0 = high, 1 = base) a :class:`sphkv.pages.PagedStore`
over :meth:`HeadTierPreset.tierset` writes as it writes an RDR plan (one tier per (layer, kv head): the pages of
a head are tier-homogeneous, as RDR's are).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import PRESETS, SphKVConfig
from .tiers import PAGE_META_BYTES, Tier, TierSet

__all__ = ["HeadTierPreset", "HEAD_PRESETS", "head_tiers", "cache_bytes", "bits_per_element"]


@dataclass(frozen=True)
class HeadTierPreset:
    """``high`` / ``base``: preset names; ``*_overrides``: fields replaced in them (``angle_bits_per_coord`` is
    allocated over the head_dim's levels as a preset's is); ``dense_sinks``: first tokens of every (layer, kv head)
    kept bf16 outside the pages; ``max_bits``: the cap on bits per element."""

    base: str
    high: str
    max_bits: float
    dense_sinks: int = 4
    base_overrides: dict = field(default_factory=dict)
    high_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (self.base, self.high):
            if name not in PRESETS:
                raise ValueError(f"preset {name!r} is not in PRESETS; allowed: {sorted(PRESETS)}")
        if not 0.0 < self.max_bits < 16.0:
            raise ValueError(f"max_bits={self.max_bits!r} must be in (0, 16)")
        if self.dense_sinks < 0:
            raise ValueError(f"dense_sinks={self.dense_sinks!r} must be >= 0")

    def config(self, which: str, head_dim: int) -> SphKVConfig:
        """The :class:`SphKVConfig` of ``which`` (``"high"`` or ``"base"``) at ``head_dim``."""
        if which not in ("high", "base"):
            raise ValueError(f"which={which!r} must be 'high' or 'base'")
        over = dict(self.high_overrides if which == "high" else self.base_overrides)
        bits = over.pop("angle_bits_per_coord", None)
        if bits is not None:
            from .codebooks import optimal_level_bits
            over["level_bits"] = optimal_level_bits(head_dim, bits)
        return SphKVConfig.from_name(self.high if which == "high" else self.base, head_dim=head_dim, **over)

    def tierset(self, head_dim: int) -> TierSet:
        """``(high, base)`` at ``head_dim``; raises when the two presets' page sizes differ."""
        hi, lo = self.config("high", head_dim), self.config("base", head_dim)
        if hi.page_size != lo.page_size:
            raise ValueError(f"high {self.high!r} has page_size {hi.page_size}, base {self.base!r} {lo.page_size}: "
                             f"a tier set needs one page size")
        return TierSet((Tier(self.high, hi), Tier(self.base, lo)), head_dim=head_dim, page_size=hi.page_size)


def cache_bytes(num_high: int, *, page_bytes: tuple[int, int], page_size: int, num_layers: int, num_kv_heads: int,
                num_tokens: int, head_dim: int, dense_sinks: int) -> int:
    """Exact stored bytes with ``num_high`` (layer, kv head) pairs at tier 0 and the rest at tier 1: per pair
    ``ceil((N - s) / P)`` pages of its tier (metadata included in ``page_bytes``) plus, with ``s`` dense sinks,
    ``s × d × 4`` bytes and one page's metadata."""
    pairs = num_layers * num_kv_heads
    if not 0 <= num_high <= pairs:
        raise ValueError(f"num_high={num_high!r} must be in 0..{pairs}")
    if not 0 <= dense_sinks < num_tokens:
        raise ValueError(f"dense_sinks={dense_sinks!r} must be in 0..num_tokens-1 ({num_tokens - 1})")
    pages = math.ceil((num_tokens - dense_sinks) / page_size)
    sink = dense_sinks * head_dim * 4 + PAGE_META_BYTES if dense_sinks else 0
    return pages * (num_high * page_bytes[0] + (pairs - num_high) * page_bytes[1]) + pairs * sink


def bits_per_element(nbytes: int, *, num_layers: int, num_kv_heads: int, num_tokens: int, head_dim: int) -> float:
    """``nbytes × 8 ÷ (N × L × Hkv × d × 2)`` (bf16 is 16)."""
    return nbytes * 8 / (num_tokens * num_layers * num_kv_heads * head_dim * 2)


def head_tiers(preset: HeadTierPreset, order, *, num_layers: int, num_kv_heads: int, num_tokens: int,
               head_dim: int):
    """Tier per (layer, kv head): ``[L, Hkv]`` int64 (0 = ``high``, 1 = ``base``).

    The first ``k`` pairs of ``order`` (``[(layer, head), ...]``, best first; every pair at most once) are high, with
    ``k`` the largest count whose :func:`cache_bytes` stays within ``max_bits`` at this shape (0 when even one does
    not fit). Raises ``ValueError`` when the all-base cache is over the cap, or ``order`` names a pair outside
    ``L × Hkv`` or twice.
    """
    import torch

    seen = set()
    for pair in order:
        l, h = pair
        if not (0 <= l < num_layers and 0 <= h < num_kv_heads):
            raise ValueError(f"order names (layer, head) {tuple(pair)} outside {num_layers} x {num_kv_heads}")
        if (l, h) in seen:
            raise ValueError(f"order names (layer, head) {(l, h)} twice")
        seen.add((l, h))
    ts = preset.tierset(head_dim)
    shape = dict(page_bytes=tuple(ts.page_bytes()), page_size=ts.page_size, num_layers=num_layers,
                 num_kv_heads=num_kv_heads, num_tokens=num_tokens, head_dim=head_dim, dense_sinks=preset.dense_sinks)
    dims = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, num_tokens=num_tokens, head_dim=head_dim)

    def bits(k: int) -> float:
        return bits_per_element(cache_bytes(k, **shape), **dims)

    if bits(0) > preset.max_bits:
        raise ValueError(f"base tier {preset.base!r} alone is {bits(0):.3f} bits/element at head_dim {head_dim}, "
                         f"{num_tokens} tokens: over max_bits={preset.max_bits}")
    k = 0
    while k < len(order) and bits(k + 1) <= preset.max_bits:
        k += 1
    tiers = torch.ones(num_layers, num_kv_heads, dtype=torch.int64)
    for l, h in list(order)[:k]:
        tiers[l, h] = 0
    return tiers


# Retrieval heads at sphkv-8, the rest at sphkv-4b, 4 dense sinks, at most 4.5 bits per element.
HEAD_PRESETS: dict[str, HeadTierPreset] = {
    "sphkv-rh4.5": HeadTierPreset(base="sphkv-4b", high="sphkv-8", max_bits=4.5),
}
