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

__all__ = ["HeadTierPreset", "HEAD_PRESETS", "head_tiers", "cache_bytes", "kept_pages", "bits_per_element",
           "bits_per_visible_element", "visible_tokens", "stored_tokens"]


@dataclass(frozen=True)
class HeadTierPreset:
    """``high`` / ``base``: preset names; ``*_overrides``: fields replaced in them (``angle_bits_per_coord`` is
    allocated over the head_dim's levels as a preset's is); ``dense_sinks``: first tokens of every (layer, kv head)
    kept bf16 outside the pages; ``max_bits``: the cap on bits per element; ``window_only``: a sliding-window layer
    stores only the tokens a later query can still see (:func:`visible_tokens`), a global layer all of them, and
    ``max_bits`` caps :func:`bits_per_visible_element` (the bits per element of what the model's own full cache
    holds: a sliding layer's visible tokens only) instead of :func:`bits_per_element`. A sliding layer keeps whole
    pages of the grid a full layer uses (:func:`stored_tokens`: a page is dropped once none of its tokens is
    visible, as a paged cache frees it), so a kept token has the codes it has in a layer that keeps everything."""

    base: str
    high: str
    max_bits: float
    dense_sinks: int = 4
    window_only: bool = False
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


def visible_tokens(num_tokens: int, windows) -> list[int]:
    """Per layer, how many of the last context tokens any later query can still see: all ``num_tokens`` for a
    global layer (``windows[l]`` None), ``min(N, window - 1)`` for a sliding layer (key ``k`` is visible to query
    ``q >= N`` iff ``q - window < k``: only ``k > N - window``)."""
    out = []
    for w in windows:
        if w is not None and w < 1:
            raise ValueError(f"window={w!r} must be None or >= 1")
        out.append(num_tokens if w is None else min(num_tokens, w - 1))
    return out


def stored_tokens(num_tokens: int, visible: list[int], *, page_size: int, dense_sinks: int) -> list[int]:
    """Per layer, how many last tokens a paged cache holds when it frees a page only once none of its tokens is
    visible: the pages of the grid (``dense_sinks`` dense tokens, then pages of ``page_size`` from token
    ``dense_sinks``, as a layer that keeps everything pages them) that hold one of the last ``visible[l]`` tokens.
    A layer whose visible tokens reach back into the sinks or the first page keeps all ``num_tokens``. The pages
    (and so the codes) of a kept token are the same as in a layer that keeps everything."""
    out = []
    for v in visible:
        if not 0 <= v <= num_tokens:
            raise ValueError(f"visible={v!r} must be in 0..{num_tokens}")
        if v == 0:
            out.append(0)
            continue
        first = num_tokens - v                                  # first visible token
        start = dense_sinks + (first - dense_sinks) // page_size * page_size if first >= dense_sinks else 0
        out.append(num_tokens if start <= dense_sinks else num_tokens - start)
    return out


def kept_pages(kept: int, *, num_tokens: int, page_size: int, dense_sinks: int) -> int:
    """Pages of one (layer, kv head) keeping its last ``kept`` tokens: a layer that keeps all ``num_tokens`` holds its
    first ``dense_sinks`` outside the pages (bf16) and pages the rest; a layer that keeps fewer pages them all."""
    return math.ceil((kept - dense_sinks if kept == num_tokens else kept) / page_size)


def cache_bytes(high, *, page_bytes: tuple[int, int], page_size: int, kept: list[int], num_tokens: int,
                head_dim: int, dense_sinks: int) -> int:
    """Exact stored bytes: ``high`` ``[L, Hkv]`` bool (tier 0 where True, tier 1 elsewhere), layer ``l`` keeping its
    last ``kept[l]`` tokens. A layer that keeps all ``N`` keeps its first ``s = dense_sinks`` in bf16 (``s × d × 4``
    bytes plus one page's metadata per kv head) and pages the other ``N - s``; a layer that keeps fewer pages
    them all (its sinks are out of every later query's window). Pages: ``ceil(tokens / P)`` per (layer, kv head)
    at its tier's ``page_bytes`` (metadata included)."""
    if not 0 <= dense_sinks < num_tokens:
        raise ValueError(f"dense_sinks={dense_sinks!r} must be in 0..num_tokens-1 ({num_tokens - 1})")
    sink = dense_sinks * head_dim * 4 + PAGE_META_BYTES if dense_sinks else 0
    total = 0
    for row, n in zip(high.tolist(), kept):
        if not 0 <= n <= num_tokens:
            raise ValueError(f"kept={n!r} must be in 0..{num_tokens}")
        full = n == num_tokens
        pages = kept_pages(n, num_tokens=num_tokens, page_size=page_size, dense_sinks=dense_sinks)
        total += sum(pages * page_bytes[0 if h else 1] + (sink if full else 0) for h in row)
    return total


def bits_per_element(nbytes: int, *, num_layers: int, num_kv_heads: int, num_tokens: int, head_dim: int) -> float:
    """``nbytes × 8 ÷ (N × L × Hkv × d × 2)`` (bf16 is 16)."""
    return nbytes * 8 / (num_tokens * num_layers * num_kv_heads * head_dim * 2)


def bits_per_visible_element(nbytes: int, *, visible: list[int], num_kv_heads: int, head_dim: int) -> float:
    """``nbytes × 8 ÷ (Σ_l visible[l] × Hkv × d × 2)``: bits per element of what the model's own full cache holds,
    ``visible[l]`` being layer ``l``'s visible tokens (:func:`visible_tokens`; a sliding layer's cache holds only its
    window). Equals :func:`bits_per_element` when every layer sees all ``N`` (no sliding layers)."""
    elements = sum(visible) * num_kv_heads * head_dim * 2
    if elements <= 0:
        raise ValueError(f"visible={visible!r} holds no token: bits per visible element are undefined")
    return nbytes * 8 / elements


def head_tiers(preset: HeadTierPreset, order, *, num_layers: int, num_kv_heads: int, num_tokens: int,
               head_dim: int, kept: list[int] | None = None, visible: list[int] | None = None):
    """Tier per (layer, kv head): ``[L, Hkv]`` int64 (0 = ``high``, 1 = ``base``).

    The pairs of ``order`` (``[(layer, head), ...]``, best first; every pair at most once) are lifted to high in that
    order while :func:`cache_bytes` (layer ``l`` keeping its last ``kept[l]`` tokens; default all) stays within
    ``max_bits`` at this shape; a pair that does not fit is skipped and later (cheaper: a sliding layer's fewer
    kept tokens) pairs are still tried. When every pair costs the same (every layer keeps all ``N``) this lifts a
    prefix of ``order``. The cap is on :func:`bits_per_element` or, with the preset's ``window_only``, on
    :func:`bits_per_visible_element` over ``visible`` (per layer the tokens a later query sees, while ``kept`` are
    the tokens stored, e.g. :func:`stored_tokens`; default: ``kept``). Raises ``ValueError`` when the all-base
    cache is over the cap, or ``order`` names a pair outside ``L × Hkv`` or twice.
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
    kept = [num_tokens] * num_layers if kept is None else list(kept)
    visible = kept if visible is None else list(visible)
    if len(kept) != num_layers or len(visible) != num_layers:
        raise ValueError(f"kept has {len(kept)}, visible {len(visible)} entries for {num_layers} layers")
    ts = preset.tierset(head_dim)
    shape = dict(page_bytes=tuple(ts.page_bytes()), page_size=ts.page_size, kept=kept, num_tokens=num_tokens,
                 head_dim=head_dim, dense_sinks=preset.dense_sinks)
    dims = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, num_tokens=num_tokens, head_dim=head_dim)
    high = torch.zeros(num_layers, num_kv_heads, dtype=torch.bool)

    def bits() -> float:
        if preset.window_only:
            return bits_per_visible_element(cache_bytes(high, **shape), visible=visible, num_kv_heads=num_kv_heads,
                                            head_dim=head_dim)
        return bits_per_element(cache_bytes(high, **shape), **dims)

    if bits() > preset.max_bits:
        unit = "bits/visible element" if preset.window_only else "bits/element"
        raise ValueError(f"base tier {preset.base!r} alone is {bits():.3f} {unit} at head_dim {head_dim}, "
                         f"{num_tokens} tokens: over max_bits={preset.max_bits}")
    for l, h in order:
        high[l, h] = True
        if bits() > preset.max_bits:
            high[l, h] = False
    return torch.where(high, 0, 1).to(torch.int64)


# Retrieval heads at sphkv-8, the rest at sphkv-4b, 4 dense sinks, at most 4.5 bits per element; "w": sliding
# layers store only the pages a later query can see, capped per visible element (measured in benchmarks/quality:
# meets issue 12's target on SmolLM2's 4 pairs; on Gemma 3 270M it misses 3 of 4 under the visible-element cap,
# where sphkv-4 with the window rule, benchmarks.quality.methods_heads "sphkv-w4+sink", meets it on all 4).
HEAD_PRESETS: dict[str, HeadTierPreset] = {
    "sphkv-rh4.5": HeadTierPreset(base="sphkv-4b", high="sphkv-8", max_bits=4.5),
    "sphkv-rh4.5w": HeadTierPreset(base="sphkv-4b", high="sphkv-8", max_bits=4.5, window_only=True),
}
