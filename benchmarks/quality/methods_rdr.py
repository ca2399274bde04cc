# SPDX-License-Identifier: Apache-2.0
"""Rate-Distortion Retention methods: the RDR allocator at a byte budget, several tier sets.

* ``ada+rdr@f`` — query-agnostic RDR: tiers sphkv-8 / sphkv-5b / sphkv-4b / sphkv-4b-a3.5 / sphkv-3b /
  sphkv-2b / drop (:func:`sphkv.retention.ada_c_tierset`), utility = the attention each token receives from
  the last 32 queries of the context (SnapKV window, ``policy="snapkv"``; no question is involved) plus a
  prior of its (layer, kv head)'s mean utility, tier distortion calibrated on every layer (last 384 tokens),
  the 4 sinks kept dense bf16 outside the pages (``dense_sinks=4``, as ``sphkv-4b+sink`` keeps them; their
  bytes come off the budget), the floor (nothing dropped while every token fits at sphkv-2b), the band
  (``spread=1``: while a uniform tier fits, only that tier and the one above it; the last 32 tokens at the
  band's top). At 25% that is the sinks dense, ~84% of the tokens at sphkv-4b and the least useful ~16% at
  sphkv-4b-a3.5 (a quarter bit lower); prior 4 in the band (``band_prior``: the demotions spread evenly over
  the heads), prior 1 below the floor. Below the floor (10%) the band does not apply: the last 32 stay at
  sphkv-8 and the least useful tokens are dropped, ranked by a KVzip-style reconstruction score instead of the
  window (``floor_policy="uniform"``, ``info_weight=8``, ``info_power=2``, ``info="reconstruction"``: utility
  ``∝ 1 + prior + 8·z`` with ``z`` the squared largest attention a token draws while the model is asked to
  repeat the context, normalized to mean 1 per (layer, kv head); :func:`sphkv.retention.utility.reconstruction_attention`,
  one extra forward per context). Chosen on essays 2K (``quality-rdr-info-sweep.json``, run e9): the window
  utility gave +0.43% and 0/24 retrieval; this score +0.06% and 7/24; mixed into the window utility instead
  (``floor_policy`` unset) it gave 0–2/24. Chosen on the essays (2K and 4K continuation NLL over 512
  tokens, retrieval of 24; ``benchmarks/quality/sweep_rdr.py``): the previous pooled utility (max attention of
  queries strided over the context) cost +1.6% / +3.0% NLL at 10% where the window utility costs +0.4% /
  +0.4% (essays 2K / 4K); at 25% the sink page at sphkv-5b instead of dense sinks cost +0.44 pp at 4K;
  demoting ~4% of the tokens to sphkv-3b instead of ~16% a quarter bit lost 2 of 24 retrieval cases at 2K;
  ``band_prior`` 0 / 1 / 4: 9 / 12 / 13 of 24 at 2K (prior 4 below the floor: +0.95% at 2K, so not there).
  The ADA tiers are attended through :class:`sphkv_hf.segments.CodedSegment` built from the store's own codes
  (logits from codes), the dense sinks through a :class:`sphkv_hf.segments.DenseSegment`.
* ``ada+rdr-v0@f`` — the previous RDR for comparison: tiers dense / sphkv-8 / sphkv-4 / sphkv-3 / drop,
  SnapKV-style utility of the last 32 queries only, one distortion per tier, no floor.
* ``rdkv@f`` — the same allocator over grid tiers bf16 / int8 / int4 / int2 / drop (RDKV-style; it isolates
  what the angle codes add); grid tiers are fake-quant dense segments with their exact stored bytes.
* ``dense+rdr@f`` — dense / drop only: RDR as pure eviction (RDR's per-head and per-layer budgets).

Budget ``f`` is a fraction of the bf16 bytes of the context; ``nbytes`` is the store's exact stored bytes
(arena bytes + :data:`sphkv.tiers.PAGE_META_BYTES` per page). Each row also states
``metadata_overhead_pct`` (page metadata ÷ stored bytes), ``position_index_pct`` (the host-side position
index, not stored on the device), the tokens per tier and the planning time (``extra_row``).
``rdkv`` and ``dense+rdr`` use the ``-v0`` utility. All: 4 sinks and the last 32 tokens protected (``ada+rdr``:
the sinks dense outside the pages); 64-token pages. Calibration is measured once per context length and reused
for its retrieval haystacks.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from sphkv.retention import RetentionConfig, compress_variant
from sphkv_hf.retention import store_prefix
from sphkv_hf.segments import DenseSegment

from .methods import CompressedPrefix, PrefillContext, register

__all__ = ["RDR", "FRACTIONS"]

FRACTIONS = (0.05, 0.10, 0.25, 0.50)
PAGE = 64
QUICK = {"ada+rdr@0.10", "ada+rdr@0.25"}
ROBUST = RetentionConfig(policy="snapkv", floor=True, per_layer=True, prior=1.0, band_prior=4.0, calib_tokens=384,
                         spread=1, dense_sinks=4, floor_policy="uniform", info_weight=8.0, info_power=2.0,
                         band_info_weight=0.0)
def _info(field: str):
    def get(ctx):
        fn = getattr(ctx, field)
        if fn is None:
            raise ValueError(f"info={field!r} needs PrefillContext.{field} (the harness's ContextTask sets it)")
        return fn()
    return get


INFO = {"surprisal": _info("surprisal"), "reconstruction": _info("reconstruction")}
_CALIB: dict = {}          # (tier set, id(context)) -> (context, calibration): shared by every budget
TIERSETS = {"ada+rdr": "ada-c+rdr", "ada+rdr-v0": "ada+rdr", "rdkv": "rdkv", "dense+rdr": "dense+rdr"}


@dataclass
class RDR:
    """RDR with the tier set ``VARIANTS[variant]`` at ``fraction`` of the bf16 bytes."""

    variant: str
    fraction: float
    name: str = "rdr"
    config: RetentionConfig | None = None              # default: ROBUST for "ada+rdr", else RetentionConfig()
    tierset: str | None = None                         # a sphkv.retention.VARIANTS name; default TIERSETS[variant]
    info: str = "reconstruction"                       # the information score (INFO) when info_weight > 0
    summaries: list = field(default_factory=list)      # one per build(); the first is the continuation context
    last: object = field(default=None, repr=False)     # the last build's RetentionResult

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction!r} must be in (0, 1]")
        if self.info not in INFO:
            raise ValueError(f"info={self.info!r} is not supported; allowed: {sorted(INFO)}")

    @property
    def budget_fraction(self) -> float:
        return self.fraction

    def build(self, ctx: PrefillContext) -> CompressedPrefix:
        robust = self.variant == "ada+rdr"
        cfg = self.config or (ROBUST if robust else RetentionConfig())
        pooled = cfg.policy == "pooled" and ctx.pooled_queries is not None
        root = ctx.base or ctx
        tiers = self.tierset or TIERSETS[self.variant]
        key = (tiers, pooled, cfg.calib_layers, cfg.per_layer, cfg.calib_tokens, id(root))
        hit = _CALIB.get(key)
        calib = hit[1] if hit is not None and hit[0] is root else None
        res = compress_variant(tiers, [k.to(torch.float32) for k in ctx.keys],
                               [v.to(torch.float32) for v in ctx.values],
                               ctx.pooled_queries if pooled else ctx.queries, self.fraction, config=cfg,
                               page_size=PAGE, q_positions=ctx.pooled_positions if pooled else None,
                               calibration=calib,
                               information=lambda: INFO[self.info](ctx))      # computed only when used
        if calib is None:
            _CALIB.clear()                                       # one context length at a time
            _CALIB[key] = (root, res.calibration)
        segments = store_prefix(res.store)
        if res.sink_k is not None:          # the dense sinks, bf16 outside the pages (as the +sink rows keep them)
            s, hkv = res.dense_sinks, ctx.num_kv_heads
            pos = torch.arange(s)[None, None].expand(1, hkv, s)
            segments = [[DenseSegment.build(sk[None], sv[None], page_size=PAGE, positions=pos)] + segs
                        for sk, sv, segs in zip(res.sink_k, res.sink_v, segments)]
        prefix = CompressedPrefix.of(segments, ctx)
        if prefix.nbytes != res.stored_bytes:
            raise AssertionError(f"segments hold {prefix.nbytes} bytes, the store {res.stored_bytes}")
        self.summaries.append(res.summary())
        self.last = res
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
                "dense_sinks": s.get("dense_sinks"),
                "plan_seconds": round(sum(t.values()), 3)}


for _v in ("ada+rdr", "ada+rdr-v0", "rdkv", "dense+rdr"):
    for _f in FRACTIONS:
        _n = f"{_v}@{_f:.2f}"
        register(_n, functools.partial(RDR, _v, _f, name=_n), quick=_n in QUICK, group=_v)
