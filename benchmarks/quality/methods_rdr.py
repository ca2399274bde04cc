# SPDX-License-Identifier: Apache-2.0
"""Rate-Distortion Retention methods: the RDR allocator at a byte budget, three tier sets.

* ``ada+rdr@f`` — tiers dense / sphkv-8 / sphkv-4 / sphkv-3 / drop (:func:`sphkv.retention.ada_tierset`);
  the ADA tiers are attended through :class:`sphkv_hf.segments.CodedSegment` built from the store's own
  codes (logits from codes).
* ``rdkv@f`` — the same allocator over grid tiers bf16 / int8 / int4 / int2 / drop (RDKV-style; it isolates
  what the angle codes add); grid tiers are fake-quant dense segments with their exact stored bytes.
* ``dense+rdr@f`` — dense / drop only: RDR as pure eviction (RDR's per-head and per-layer budgets).

Budget ``f`` is a fraction of the bf16 bytes of the context; ``nbytes`` is the store's exact stored bytes
(arena bytes + :data:`sphkv.tiers.PAGE_META_BYTES` per page). Each row also states
``metadata_overhead_pct`` (page metadata ÷ stored bytes), ``position_index_pct`` (the host-side position
index, not stored on the device), the tokens per tier and the planning time (``extra_row``).
Utility: SnapKV-style observation-window attention of the last 32 context queries, 4 sinks and the
last 32 tokens protected (:class:`sphkv.retention.RetentionConfig` defaults); 64-token pages.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from sphkv.retention import RetentionConfig, compress_variant
from sphkv_hf.retention import store_prefix

from .methods import CompressedPrefix, PrefillContext, register

__all__ = ["RDR", "FRACTIONS"]

FRACTIONS = (0.05, 0.10, 0.25, 0.50)
PAGE = 64
QUICK = {"ada+rdr@0.10", "ada+rdr@0.25", "rdkv@0.10", "dense+rdr@0.10"}


@dataclass
class RDR:
    """RDR with the tier set ``VARIANTS[variant]`` at ``fraction`` of the bf16 bytes."""

    variant: str
    fraction: float
    name: str = "rdr"
    config: RetentionConfig = field(default_factory=RetentionConfig)
    summaries: list = field(default_factory=list)      # one per build(); the first is the continuation context

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction!r} must be in (0, 1]")

    @property
    def budget_fraction(self) -> float:
        return self.fraction

    def build(self, ctx: PrefillContext) -> CompressedPrefix:
        res = compress_variant(self.variant, [k.to(torch.float32) for k in ctx.keys],
                               [v.to(torch.float32) for v in ctx.values], ctx.queries, self.fraction,
                               config=self.config, page_size=PAGE)
        prefix = CompressedPrefix.of(store_prefix(res.store), ctx)
        if prefix.nbytes != res.stored_bytes:
            raise AssertionError(f"segments hold {prefix.nbytes} bytes, the store {res.stored_bytes}")
        self.summaries.append(res.summary())
        return prefix

    def extra_row(self) -> dict:
        """Keys added to the harness row: metadata overhead, tokens per tier, planning time (continuation context)."""
        if not self.summaries:
            return {}
        s = self.summaries[0]
        t = s["timings"]
        return {"metadata_overhead_pct": 100.0 * s["metadata_overhead"],
                "position_index_pct": 100.0 * s["position_index_overhead"],
                "stored_bytes": s["stored_bytes"], "budget_bytes": s["budget_bytes"],
                "tiers": s["tiers"], "tier_distortion": s["distortion"],
                "tokens_per_tier": s.get("tokens_per_tier"),
                "plan_seconds": round(sum(t.values()), 3)}


for _v in ("ada+rdr", "rdkv", "dense+rdr"):
    for _f in FRACTIONS:
        _n = f"{_v}@{_f:.2f}"
        register(_n, functools.partial(RDR, _v, _f, name=_n), quick=_n in QUICK, group=_v)
