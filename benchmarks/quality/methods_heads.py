# SPDX-License-Identifier: Apache-2.0
"""Head-tiered ADA: the retrieval heads of the model at a high tier, every other (layer, kv head) at a base tier.

* ``sphkv-rh4.5+sink`` — :data:`sphkv.headtiers.HEAD_PRESETS` ``"sphkv-rh4.5"``: the 4 first tokens of every
  (layer, kv head) dense bf16, the rest coded at ``sphkv-4b`` except the best-ranked (layer, kv head)s of the
  model's head table (``benchmarks/quality/retrieval_heads.json``, measured on the essays by
  :mod:`benchmarks.quality.heads`), lifted to ``sphkv-8`` in rank order while the whole cache stays at
  ≤ 4.5 bits per element (every byte counted: :func:`sphkv.headtiers.head_tiers`).
* ``sphkv-rh4.5w+sink`` — ``"sphkv-rh4.5w"``: the same, and a sliding-window layer stores only the tokens a later
  query can still see (the whole pages holding its last ``window - 1`` tokens, on the page grid a full layer uses:
  a page is dropped once none of its tokens is visible; the HF cache likewise holds only a sliding layer's window),
  and the 4.5-bit cap is on bits per *visible* element (stored bytes × 8 over the elements the model's own full
  cache holds: a sliding layer counts only its visible tokens; rows gain ``bits_per_visible_element``, while
  ``bits_per_element`` keeps dividing by ``N × L × Hkv × d × 2``). On a model without sliding layers the two are
  equal and the preset is ``sphkv-rh4.5+sink``.
* ``sphkv-w4+sink`` — plain ``sphkv-4`` (high = base: no head tiers) with the window rule and the visible-element
  cap: the kept tokens have ``sphkv-4+sink``'s codes. Meets issue 12's target on Gemma 3 270M's 4 pairs, where
  ``sphkv-rh4.5w+sink`` under the visible-element cap does not (README, Gemma section).
* other ``sphkv-rh*`` names: candidate tier pairs, the same rules.

The pages are written by :class:`sphkv.pages.PagedStore` over the preset's two-tier set (the store RDR writes its
plans into; one tier per (layer, kv head) here) and attended through :func:`sphkv_hf.retention.store_prefix`
(``CodedSegment`` from the store's own codes: logits from codes); the sinks through a ``DenseSegment``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from sphkv.headtiers import (HEAD_PRESETS, HeadTierPreset, bits_per_visible_element, head_tiers, kept_pages,
                             stored_tokens, visible_tokens)
from sphkv.pages import PagedStore
from sphkv_hf.retention import store_prefix
from sphkv_hf.segments import DenseSegment

from .heads import load_table
from .methods import CompressedPrefix, PrefillContext, register

__all__ = ["HeadTiered", "CANDIDATES"]


@dataclass
class HeadTiered:
    preset: HeadTierPreset
    name: str = "sphkv-rh"
    budget_fraction: float | None = None
    table: dict | None = None                         # default: load_table(model config) at the first build
    last_tiers: torch.Tensor | None = field(default=None, repr=False)   # [L, Hkv] of the last build
    last_visible_bits: float | None = field(default=None, repr=False)   # window_only: bits per visible element

    def visible(self, ctx: PrefillContext) -> list[int]:
        """Per layer, how many last tokens a later query can see (``model_config.layer_types`` /
        ``sliding_window``; a model without them has global layers only): what the model's own full cache holds."""
        types = getattr(ctx.model_config, "layer_types", None)
        w = getattr(ctx.model_config, "sliding_window", None)
        windows = [w if types and types[l] == "sliding_attention" else None for l in range(ctx.num_layers)]
        return visible_tokens(ctx.num_tokens, windows)

    def kept(self, ctx: PrefillContext) -> list[int]:
        """Per layer, how many last tokens are stored: all, or with the preset's ``window_only`` the whole pages that
        hold a visible token (:func:`sphkv.headtiers.stored_tokens`, on the page grid of a layer that keeps all)."""
        if not self.preset.window_only:
            return [ctx.num_tokens] * ctx.num_layers
        return stored_tokens(ctx.num_tokens, self.visible(ctx), page_size=self.preset.tierset(ctx.head_dim).page_size,
                             dense_sinks=self.preset.dense_sinks)

    def tiers_for(self, ctx: PrefillContext) -> torch.Tensor:
        """``[L, Hkv]`` int64: 0 = high tier, 1 = base tier, for this context's shape."""
        table = self.table if self.table is not None else load_table(ctx.model_config)
        return head_tiers(self.preset, [tuple(p) for p in table["order"]], num_layers=ctx.num_layers,
                          num_kv_heads=ctx.num_kv_heads, num_tokens=ctx.num_tokens, head_dim=ctx.head_dim,
                          kept=self.kept(ctx), visible=self.visible(ctx))

    def build(self, ctx: PrefillContext) -> CompressedPrefix:
        s, hkv, n = self.preset.dense_sinks, ctx.num_kv_heads, ctx.num_tokens
        ts = self.preset.tierset(ctx.head_dim)
        tiers, kept = self.tiers_for(ctx), self.kept(ctx)
        per_tier = [0] * len(ts)
        for l, m in enumerate(kept):
            pages = kept_pages(m, num_tokens=n, page_size=ts.page_size, dense_sinks=s)
            for t in tiers[l].tolist():
                per_tier[t] += pages
        store = PagedStore(ts, per_tier, num_layers=ctx.num_layers, num_kv_heads=hkv)
        segments = []
        for l, (k, v) in enumerate(zip(ctx.keys, ctx.values)):
            plan = torch.full((hkv, n), len(ts), dtype=torch.int64)             # len(ts): not in the store
            plan[:, s if kept[l] == n else n - kept[l]:] = tiers[l][:, None]
            store.write_plan(l, k.to(torch.float32), v.to(torch.float32), plan)
        for l, (k, v, segs) in enumerate(zip(ctx.keys, ctx.values, store_prefix(store))):
            if s and kept[l] == n:                                              # the dense sinks of a full layer
                pos = torch.arange(s)[None, None].expand(1, hkv, s)
                segs = [DenseSegment.build(k[..., :s, :], v[..., :s, :], page_size=ts.page_size, positions=pos)] + segs
            segments.append(segs)
        self.last_tiers = tiers
        prefix = CompressedPrefix.of(segments, ctx)
        if self.preset.window_only:
            self.last_visible_bits = bits_per_visible_element(prefix.nbytes, visible=self.visible(ctx),
                                                              num_kv_heads=hkv, head_dim=ctx.head_dim)
        return prefix

    def extra_row(self) -> dict:
        if self.last_tiers is None:
            return {}
        row = {"high_heads": [[int(l), int(h)] for l, h in (self.last_tiers == 0).nonzero().tolist()],
               "tiers": [self.preset.high, self.preset.base]}
        if self.last_visible_bits is not None:            # window_only rows: the cap's (honest) convention
            row["bits_per_visible_element"] = self.last_visible_bits
        return row


# The presets of sphkv.headtiers (the first: the successor of sphkv-4b+sink), then tier pairs screened with
# benchmarks.quality.needles.
CANDIDATES: dict[str, HeadTierPreset] = {
    "sphkv-rh4.5w+sink": HEAD_PRESETS["sphkv-rh4.5w"],
    "sphkv-rh4.5+sink": HEAD_PRESETS["sphkv-rh4.5"],
    "sphkv-rh4.5-h5b+sink": HeadTierPreset(base="sphkv-4b", high="sphkv-5b", max_bits=4.5),
    "sphkv-rh4.5-v4+sink": HeadTierPreset(base="sphkv-4b", high="sphkv-8", max_bits=4.5,
                                          base_overrides={"angle_bits_per_coord": 3.75, "value_bits": 4}),
    # window-only, capped at 4.5 bits per visible element (issue 12 follow-up): intermediate high tiers.
    "sphkv-rh4.5w-h5b+sink": HeadTierPreset(base="sphkv-4b", high="sphkv-5b", max_bits=4.5, window_only=True),
    "sphkv-rh4.5w-a4+sink": HeadTierPreset(base="sphkv-4", high="sphkv-8", max_bits=4.5, window_only=True),
    "sphkv-rh4.5w-4h5b+sink": HeadTierPreset(base="sphkv-4", high="sphkv-5b", max_bits=4.5, window_only=True),
    # no lift (high = base): sphkv-4+sink with the window rule (the same codes, fewer pages)
    "sphkv-w4+sink": HeadTierPreset(base="sphkv-4", high="sphkv-4", max_bits=4.5, window_only=True),
}
for _n, _p in CANDIDATES.items():
    register(_n, functools.partial(HeadTiered, _p, name=_n), group="sphkv-rh")
