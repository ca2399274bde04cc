# SPDX-License-Identifier: Apache-2.0
"""Rate-Distortion Retention methods: the RDR allocator at a byte budget, several tier sets.

* ``ada+rdr@f`` — query-agnostic RDR: tiers dense / sphkv-8 / sphkv-5b / sphkv-4b / sphkv-3b / sphkv-2b /
  drop (:func:`sphkv.retention.ada_b_tierset`, the tuned presets), utility = the largest attention each
  token receives from queries strided over the whole context (every 32nd position) plus the last 32
  (``policy="pooled"``) plus the (layer, kv head)'s mean utility (``prior=1``: no token is worth less
  than an average one — the next question may ask for any of them), tier distortion calibrated on
  every layer (last 384 tokens), the floor (nothing dropped while every token fits at sphkv-2b), the
  band (``spread=1``: while a uniform tier fits, only that tier and the one above it are used; inside
  the band the whole first page — the 4 sinks and their page — is protected one tier higher,
  ``lift=1``, ``band_sinks=PAGE``: at 25% that is the first page at sphkv-5b, sphkv-4b elsewhere, the
  least useful ~3% of tokens at sphkv-3b). Chosen on the essays at 2K only (continuation NLL, retrieval
  of 24): no band +0.21%, 9; spread 2 +0.46% (NLL only); spread 1 with sinks+recent at sphkv-4b −0.23%, 10;
  their page at sphkv-5b (own page) +0.74%, 9; first page at sphkv-5b −0.26%, 11; at sphkv-8 +0.29%, 8.
  Below the floor the band does not apply (sinks + last 32 at sphkv-8, drops). The ADA tiers are attended through
  :class:`sphkv_hf.segments.CodedSegment` built from the store's own codes (logits from codes).
* ``ada+rdr-v0@f`` — the previous RDR for comparison: tiers dense / sphkv-8 / sphkv-4 / sphkv-3 / drop,
  SnapKV-style utility of the last 32 queries only, one distortion per tier, no floor.
* ``rdkv@f`` — the same allocator over grid tiers bf16 / int8 / int4 / int2 / drop (RDKV-style; it isolates
  what the angle codes add); grid tiers are fake-quant dense segments with their exact stored bytes.
* ``dense+rdr@f`` — dense / drop only: RDR as pure eviction (RDR's per-head and per-layer budgets).

Budget ``f`` is a fraction of the bf16 bytes of the context; ``nbytes`` is the store's exact stored bytes
(arena bytes + :data:`sphkv.tiers.PAGE_META_BYTES` per page). Each row also states
``metadata_overhead_pct`` (page metadata ÷ stored bytes), ``position_index_pct`` (the host-side position
index, not stored on the device), the tokens per tier and the planning time (``extra_row``).
``rdkv`` and ``dense+rdr`` use the ``-v0`` utility. All: 4 sinks and the last 32 tokens protected; 64-token
pages. Calibration is measured once per context length and reused for its retrieval haystacks.
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
QUICK = {"ada+rdr@0.10", "ada+rdr@0.25"}
ROBUST = RetentionConfig(policy="pooled", floor=True, per_layer=True, prior=1.0, calib_tokens=384, spread=1, lift=1,
                         band_sinks=PAGE)
_CALIB: dict = {}          # (tier set, id(context)) -> (context, calibration): shared by every budget
TIERSETS = {"ada+rdr": "ada-b+rdr", "ada+rdr-v0": "ada+rdr", "rdkv": "rdkv", "dense+rdr": "dense+rdr"}


@dataclass
class RDR:
    """RDR with the tier set ``VARIANTS[variant]`` at ``fraction`` of the bf16 bytes."""

    variant: str
    fraction: float
    name: str = "rdr"
    config: RetentionConfig | None = None              # default: ROBUST for "ada+rdr", else RetentionConfig()
    summaries: list = field(default_factory=list)      # one per build(); the first is the continuation context

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction!r} must be in (0, 1]")

    @property
    def budget_fraction(self) -> float:
        return self.fraction

    def build(self, ctx: PrefillContext) -> CompressedPrefix:
        robust = self.variant == "ada+rdr"
        cfg = self.config or (ROBUST if robust else RetentionConfig())
        pooled = robust and ctx.pooled_queries is not None
        root = ctx.base or ctx
        key = (TIERSETS[self.variant], cfg.per_layer, cfg.calib_tokens, id(root))
        hit = _CALIB.get(key)
        calib = hit[1] if hit is not None and hit[0] is root else None
        res = compress_variant(TIERSETS[self.variant], [k.to(torch.float32) for k in ctx.keys],
                               [v.to(torch.float32) for v in ctx.values],
                               ctx.pooled_queries if pooled else ctx.queries, self.fraction, config=cfg,
                               page_size=PAGE, q_positions=ctx.pooled_positions if pooled else None,
                               calibration=calib)
        if calib is None:
            _CALIB.clear()                                       # one context length at a time
            _CALIB[key] = (root, res.calibration)
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
                "tokens_per_tier": s.get("tokens_per_tier"), "plan_source": s.get("source"),
                "floor_held": s.get("floor"), "dropped_tokens": s.get("dropped"),
                "plan_seconds": round(sum(t.values()), 3)}


for _v in ("ada+rdr", "ada+rdr-v0", "rdkv", "dense+rdr"):
    for _f in FRACTIONS:
        _n = f"{_v}@{_f:.2f}"
        register(_n, functools.partial(RDR, _v, _f, name=_n), quick=_n in QUICK, group=_v)
