# SPDX-License-Identifier: Apache-2.0
"""Compress a prefilled cache under a byte budget: utility → calibration → allocation → pages.

Entry points for the quality harness (torch only):

* :func:`compress_prefill` — any :class:`~sphkv.tiers.TierSet` (ADA tiers, grid tiers, dense only).
* :func:`compress_variant` — by name from ``VARIANTS``: ``"ada+rdr"`` (dense / sphkv-8 / sphkv-4 /
  sphkv-3 / drop), ``"rdkv"`` (grid tiers 16 / 8 / 4 / 2 bits / drop: the same allocator without angle
  codes) and ``"dense+rdr"`` (dense / drop: pure eviction with RDR's budgets).

The result holds the plan, the paged store, exact stored bytes, and views for an attention
implementation: per-head segments (kept positions per tier with decoded K/V) and a dense view with
a keep mask (``[1, Hkv, N, d]`` reconstructions, zeros where dropped).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..codebooks import optimal_level_bits
from ..config import SphKVConfig
from ..gridquant import grid_tierset
from ..pages import PagedStore, paged_attention
from ..tiers import PAGE_META_BYTES, Tier, TierSet
from .allocation import Plan, TierCosts, allocate, band_tiers, bf16_bytes, budget_from_fraction
from .calibration import TierStats, calibrate
from .utility import POLICIES, information_score, layer_utility, make_policy, protected_mask

__all__ = ["RetentionConfig", "RetentionResult", "Segment", "compress_prefill", "compress_variant", "VARIANTS",
           "ada_tierset", "ada_b_tierset", "ada_c_tierset", "rdkv_tierset", "eviction_tierset"]

_POLICY_PARAMS = {"snapkv": lambda c: dict(pool=c.pool, kernel=c.kernel), "pooled": lambda c: dict(kernel=c.kernel)}


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How :func:`compress_prefill` estimates utility and calibrates.

    ``policy`` names a utility policy (``sphkv.retention.POLICIES``; ``pool``/``kernel`` apply to
    ``"snapkv"``); ``sinks`` and ``recent`` tokens are protected at tier 0; an uncalibrated tier
    set is calibrated on ``calib_layers`` evenly spaced layers over their last ``calib_tokens``
    tokens with the given queries.

    Robustness (query-agnostic retention, the next question unknown at compression time):
    ``floor`` drops nothing while every token fits at the least precise tier; ``prior`` adds
    ``prior × mean utility`` of its (layer, kv head) to every token (no token is worth exactly nothing);
    ``per_layer`` calibrates every layer's tier distortion on that layer (``calib_layers`` then only
    sets the global row kept in the tier set). The allocator never returns a plan worse on its own
    objective than the best uniform tier that fits (:func:`sphkv.retention.allocate`). ``spread`` (``None``:
    off) confines the plan to a band of ``spread + 1`` tiers ending at the most precise tier whose uniform
    plan fits, protected tokens at the band's top, or ``lift`` tiers above it (``allocate(spread=, lift=)``);
    with ``band_sinks`` the protected tokens inside the band are the first ``band_sinks`` only (no recent
    window), e.g. one whole page so that lifted sinks do not pay for a mostly empty page.

    ``dense_sinks`` keeps the first ``dense_sinks`` tokens of every (layer, kv head) in bf16 outside the pages
    (as ``CachePolicy(dense_sink=)`` and the harness's ``+sink`` rows do): their bytes (``dense_sinks × d × 4``
    plus :data:`sphkv.tiers.PAGE_META_BYTES` per (layer, kv head)) come off the budget and the allocator plans
    the other tokens; ``sinks`` and ``band_sinks`` then count from the first paged token
    (``max(sinks - dense_sinks, 0)`` of them protected, ``band_sinks`` of them protected in the band).
    ``band_prior`` (``None``: ``prior``) replaces ``prior`` when the band applies (a uniform tier fits the
    budget): there the utility only picks which tokens sit one tier lower, and a larger prior spreads those
    demotions more evenly over the (layer, kv head)s; below the floor (drops) ``prior`` applies.

    Information content (query-agnostic, for budgets where tokens are dropped): with ``info_weight > 0`` every
    token of a (layer, kv head) also gets ``info_weight × z × mean utility`` of that head, where ``z`` is
    :func:`sphkv.retention.utility.information_score` of a query-agnostic score (``compress_prefill(information=)``:
    the surprisal ``[N]`` or a reconstruction attention ``[L, Hkv, N]``; max-pooled over ``info_kernel`` tokens,
    raised to ``info_power``, mean 1 per head): like ``prior``, but a token the model cannot regenerate weighs
    more. ``band_info_weight`` (``None``: ``info_weight``) replaces it when the band applies. ``floor_policy``
    (``None``: ``policy``) is the utility policy used when the band does not apply (below the floor, where tokens
    are dropped), e.g. ``"uniform"`` so that the information score alone ranks the tokens there.
    """

    policy: str = "snapkv"
    pool: str = "avg"
    kernel: int = 5
    sinks: int = 4
    recent: int = 32
    calib_layers: int = 4
    calib_tokens: int = 1024
    floor: bool = False
    prior: float = 0.0
    per_layer: bool = False
    spread: int | None = None
    lift: int = 0
    band_sinks: int | None = None
    dense_sinks: int = 0
    band_prior: float | None = None
    info_weight: float = 0.0
    info_kernel: int = 1
    info_power: float = 1.0
    band_info_weight: float | None = None
    floor_policy: str | None = None
    debug: bool = False

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} is not registered; allowed: {sorted(POLICIES)}")
        for name in ("sinks", "recent", "dense_sinks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not 0.0 <= self.prior < float("inf"):
            raise ValueError(f"prior={self.prior!r} must be finite and >= 0")
        if self.band_prior is not None and not 0.0 <= self.band_prior < float("inf"):
            raise ValueError(f"band_prior={self.band_prior!r} must be None or finite and >= 0")
        for name in ("info_weight", "band_info_weight"):
            x = getattr(self, name)
            if x is not None and not 0.0 <= x < float("inf"):
                raise ValueError(f"{name}={x!r} must be finite and >= 0" + (" (or None)" if name[0] == "b" else ""))
        if not isinstance(self.info_kernel, int) or self.info_kernel < 1 or self.info_kernel % 2 == 0:
            raise ValueError(f"info_kernel={self.info_kernel!r} must be a positive odd int")
        if not 0.0 < self.info_power < float("inf"):
            raise ValueError(f"info_power={self.info_power!r} must be finite and > 0")
        if self.spread is not None and (not isinstance(self.spread, int) or isinstance(self.spread, bool)
                                        or self.spread < 0):
            raise ValueError(f"spread={self.spread!r} must be None or an int >= 0")
        if not isinstance(self.lift, int) or isinstance(self.lift, bool) or self.lift < 0:
            raise ValueError(f"lift={self.lift!r} must be an int >= 0")
        if self.band_sinks is not None and (not isinstance(self.band_sinks, int) or isinstance(self.band_sinks, bool)
                                            or self.band_sinks < 0):
            raise ValueError(f"band_sinks={self.band_sinks!r} must be None or an int >= 0")
        for name in ("calib_layers", "calib_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.floor_policy is not None and self.floor_policy not in POLICIES:
            raise ValueError(f"floor_policy={self.floor_policy!r} is not registered; allowed: {sorted(POLICIES)}")
        self.make_policy()                                            # validates pool / kernel

    def make_policy(self, name: str | None = None):
        """The utility policy ``name`` (default ``policy``) with this config's parameters."""
        name = name or self.policy
        return make_policy(name, **_POLICY_PARAMS.get(name, lambda c: {})(self))


@dataclass(frozen=True)
class Segment:
    """Tokens of one (layer, kv head) kept at one tier.

    ``positions`` ``[n]`` int64 (ascending), decoded ``k``, ``v`` ``[n, d]`` float32.
    """

    tier: int
    name: str
    positions: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


@dataclass
class RetentionResult:
    """Plan + paged store of a compressed prefill, with exact bytes (see the module docstring).

    With ``dense_sinks = s > 0`` the first ``s`` positions are not in the store: they are ``sink_k`` / ``sink_v``
    (bf16, counted in ``stored_bytes``), and ``plan`` covers positions ``s..N-1`` (``plan.tiers[..., i]`` is
    position ``s + i``; its counts and ``tokens_per_tier`` leave the sinks out).
    """

    plan: Plan
    store: PagedStore
    tierset: TierSet
    utility: torch.Tensor
    num_tokens: int
    budget_fraction: float | None
    bf16_bytes: int
    tier_stats: list[TierStats] | None = None
    timings: dict = field(default_factory=dict)
    calibration: tuple | None = None          # (tierset, stats, layer_distortion) for reuse on the same model
    sink_k: list[torch.Tensor] | None = None  # dense_sinks > 0: per layer [Hkv, s, d] bf16 (positions 0..s-1)
    sink_v: list[torch.Tensor] | None = None

    @property
    def dense_sinks(self) -> int:
        return 0 if self.sink_k is None else self.sink_k[0].shape[-2]

    @property
    def sink_bytes(self) -> int:
        """Bytes of the dense sinks: bf16 K and V plus one page's metadata per (layer, kv head); 0 without."""
        if self.sink_k is None:
            return 0
        layers, (hkv, s, d) = len(self.sink_k), self.sink_k[0].shape
        return layers * hkv * (s * d * 2 * 2 + PAGE_META_BYTES)

    @property
    def stored_bytes(self) -> int:
        """Every stored byte: the store's pages (metadata included) plus the dense sinks."""
        return self.store.bytes().stored_bytes + self.sink_bytes

    @property
    def bits_per_element(self) -> float:
        """All stored bytes × 8 ÷ (tokens × layers × kv heads × head_dim × 2); bf16 is 16."""
        return self.stored_bytes * 8 / (self.bf16_bytes / 2)

    def layer_segments(self, layer: int) -> list[list[Segment]]:
        """Per kv head, per non-empty tier: kept positions (ascending) and decoded K/V."""
        out = []
        for h in range(self.store.num_kv_heads):
            pos, k, v, tier = self.store.gather(layer, h)
            segs = [Segment(t, self.tierset.tiers[t].name, pos[tier == t], k[tier == t], v[tier == t])
                    for t in range(len(self.tierset)) if bool((tier == t).any())]
            if self.sink_k is not None:
                segs.insert(0, Segment(-1, "dense-sink", torch.arange(self.dense_sinks),
                                       self.sink_k[layer][h].float(), self.sink_v[layer][h].float()))
            out.append(segs)
        return out

    def dense_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k_hat, v_hat, keep)``: ``[1, Hkv, N, d]`` float32 (zeros where dropped) and ``[1, Hkv, N]`` bool."""
        hkv, n, d = self.store.num_kv_heads, self.num_tokens, self.store.head_dim
        k_hat, v_hat = torch.zeros(1, hkv, n, d), torch.zeros(1, hkv, n, d)
        keep = torch.zeros(1, hkv, n, dtype=torch.bool)
        for h in range(hkv):
            pos, k, v, _ = self.store.gather(layer, h)
            k_hat[0, h, pos], v_hat[0, h, pos], keep[0, h, pos] = k, v, True
            if self.sink_k is not None:
                s = self.dense_sinks
                k_hat[0, h, :s], v_hat[0, h, :s] = self.sink_k[layer][h].float(), self.sink_v[layer][h].float()
                keep[0, h, :s] = True
        return k_hat, v_hat, keep

    def attention(self, layer: int, q: torch.Tensor, **kwargs):
        """:func:`sphkv.pages.paged_attention` over this layer's pages (no dense sinks: raises with them)."""
        if self.sink_k is not None:
            raise ValueError(f"dense_sinks={self.dense_sinks}: paged_attention covers the pages only, not the sinks")
        return paged_attention(q, self.store, layer, **kwargs)

    def summary(self) -> dict:
        """JSON-friendly numbers: bytes, bits per element, overheads, tokens per tier, per-layer bytes, timings."""
        b = self.store.bytes()
        return dict(budget_fraction=self.budget_fraction, budget_bytes=self.plan.budget_bytes + self.sink_bytes,
                    stored_bytes=self.stored_bytes, dense_sinks=self.dense_sinks, sink_bytes=self.sink_bytes,
                    bf16_bytes=self.bf16_bytes, bits_per_element=self.bits_per_element,
                    metadata_overhead=b.metadata_overhead, position_index_overhead=b.position_overhead,
                    tiers=[t.name for t in self.tierset.tiers], distortion=list(self.tierset.distortion),
                    layer_distortion=(self.calibration[2].tolist() if self.calibration and self.calibration[2]
                                      is not None else None),
                    **{k: v for k, v in self.plan.summary().items() if k not in ("stored_bytes", "budget_bytes")},
                    bytes_per_layer=self.plan.bytes_per_layer().tolist(), timings=dict(self.timings))


def _strip(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"{name} must have batch 1, got {tuple(x.shape)}")
        return x[0]
    if x.dim() != 3:
        raise ValueError(f"{name} must be [1, H, N, d] or [H, N, d], got {tuple(x.shape)}")
    return x


def _calib_queries(queries, q_positions, n: int, t: int):
    """Queries (per layer ``[Hq, M, d]``) and positions among the last ``t`` keys, for calibration."""
    m = queries[0].shape[1]
    pos = q_positions if q_positions is not None else torch.arange(n - m, n)
    sel = pos >= n - t
    return [q[:, sel] for q in queries], pos[sel] - (n - t)


def _calibrate(ts: TierSet, keys, values, queries, cfg: RetentionConfig, sm_scale, q_positions=None):
    """(calibrated tier set, stats, per-layer distortion ``[L, T]`` or None)."""
    num, n = len(keys), keys[0].shape[1]
    t = min(cfg.calib_tokens, n)
    cq, cpos = _calib_queries(queries, q_positions, n, t)
    idx = sorted({round(i * (num - 1) / max(cfg.calib_layers - 1, 1)) for i in range(min(cfg.calib_layers, num))})
    k = torch.stack([keys[i][:, -t:] for i in idx])
    v = torch.stack([values[i][:, -t:] for i in idx])
    q = torch.stack([cq[i] for i in idx])
    out, stats = calibrate(ts, k, v, q, sm_scale=sm_scale, q_positions=cpos, return_stats=True)
    if not cfg.per_layer:
        return out, stats, None
    rows = []
    for i in range(num):
        _, st = calibrate(ts, keys[i][:, -t:], values[i][:, -t:], cq[i], sm_scale=sm_scale, q_positions=cpos,
                          return_stats=True)
        rows.append(torch.tensor([x.distortion for x in st], dtype=torch.float64).cummax(0).values)
    return out, stats, torch.stack(rows)


def compress_prefill(keys: list[torch.Tensor], values: list[torch.Tensor], queries: list[torch.Tensor],
                     tierset: TierSet, budget_fraction: float | None = None, *, budget_bytes: int | None = None,
                     config: RetentionConfig = RetentionConfig(), sm_scale: float | None = None,
                     q_positions: torch.Tensor | None = None, calibration=None,
                     information=None) -> RetentionResult:
    """Plan and store a prefilled cache under a budget.

    Parameters
    ----------
    keys, values : per layer ``[1, Hkv, N, d]`` float (post-RoPE keys).
    queries : per layer ``[1, Hq, W, d]`` — prefill queries (post-RoPE): the last ``W`` (the
        observation window) by default, or any positions given in ``q_positions`` ``[W]`` (e.g.
        strided over the context plus the window, for ``policy="pooled"``).
    information : ``[N]`` or ``[L, Hkv, N]`` float ``>= 0``, a query-agnostic information score of the context
        tokens (e.g. surprisal ``-log p(x_t | x_<t)``, or :func:`sphkv.retention.utility.reconstruction_attention`
        per layer), or a zero-argument callable returning it (called only when needed); needed when the
        ``info_weight`` that applies is > 0, ignored otherwise.
    calibration : ``(tierset, stats, layer_distortion)`` from an earlier call on the same model
        (``RetentionResult.calibration``) to skip calibrating again.
    tierset : tiers, most precise first; calibrated on these samples when ``distortion`` is empty.
    budget_fraction : budget as a fraction of the bf16 bytes; or give ``budget_bytes`` (exact bytes).

    Examples
    --------
    >>> torch.manual_seed(0) is not None
    True
    >>> ks = [torch.randn(1, 2, 300, 64) for _ in range(2)]
    >>> vs = [torch.randn(1, 2, 300, 64) for _ in range(2)]
    >>> qs = [torch.randn(1, 6, 16, 64) for _ in range(2)]
    >>> res = compress_prefill(ks, vs, qs, ada_tierset(page_size=16), 0.25)
    >>> res.stored_bytes <= res.plan.budget_bytes, res.stored_bytes == res.plan.stored_bytes
    (True, True)
    >>> k_hat, v_hat, keep = res.dense_view(0)
    >>> k_hat.shape, bool(keep[0, :, :4].all())
    (torch.Size([1, 2, 300, 64]), True)
    """
    t0 = time.perf_counter()
    keys = [_strip(k, "keys") for k in keys]
    values = [_strip(v, "values") for v in values]
    queries = [_strip(q, "queries") for q in queries]
    if not keys or len(values) != len(keys) or len(queries) != len(keys):
        raise ValueError(f"keys, values, queries need one entry per layer, got "
                         f"{len(keys)}, {len(values)}, {len(queries)}")
    hkv, n, d = keys[0].shape
    if d != tierset.head_dim:
        raise ValueError(f"head_dim {d} of the keys differs from tierset.head_dim={tierset.head_dim}")
    timings = {}
    stats, layer_dist = None, None
    if calibration is not None:
        tierset, stats, layer_dist = calibration
    elif not tierset.distortion:
        t1 = time.perf_counter()
        tierset, stats, layer_dist = _calibrate(tierset, keys, values, queries, config, sm_scale, q_positions)
        timings["calibrate_s"] = time.perf_counter() - t1
    full = bf16_bytes(n, len(keys), hkv, d)
    if budget_bytes is None:
        if budget_fraction is None:
            raise ValueError("give budget_fraction or budget_bytes")
        budget_bytes = budget_from_fraction(budget_fraction, n, len(keys), hkv, d)
    s = config.dense_sinks
    if s >= n:
        raise ValueError(f"dense_sinks={s} must be below the number of tokens {n}")
    sink_bytes = len(keys) * hkv * (s * d * 2 * 2 + PAGE_META_BYTES) if s else 0
    if budget_bytes - sink_bytes <= 0:
        raise ValueError(f"budget_bytes={budget_bytes} does not cover the dense sinks ({sink_bytes} bytes for "
                         f"dense_sinks={s})")
    t2 = time.perf_counter()
    m = n - s                                                   # the paged tokens: positions s..n-1
    costs = TierCosts.from_tierset(tierset)
    protected = protected_mask(m, sinks=max(config.sinks - s, 0), recent=config.recent)
    band_protected = None if config.band_sinks is None else protected_mask(m, sinks=config.band_sinks, recent=0)
    prior, info = config.prior, config.info_weight
    in_band = False
    if config.spread is not None:
        n_band = int((protected if band_protected is None else band_protected).sum())
        in_band = band_tiers(torch.full((len(keys) * hkv,), n_band), m, costs.page_bytes, costs.page_size,
                             budget_bytes - sink_bytes, config.spread, config.lift) is not None
    if in_band:
        prior = config.prior if config.band_prior is None else config.band_prior
        info = config.info_weight if config.band_info_weight is None else config.band_info_weight
    t1 = time.perf_counter()
    policy = config.make_policy(None if in_band else config.floor_policy)
    utility = layer_utility(policy, keys, queries, sm_scale=sm_scale, q_positions=q_positions)
    timings["utility_s"] = time.perf_counter() - t1
    extra = prior
    if info:
        if information is None:
            raise ValueError(f"info_weight={info!r} needs an information score (compress_prefill(information=))")
        if callable(information):
            information = information()
        if tuple(information.shape) not in ((n,), tuple(utility.shape)):
            raise ValueError(f"information must be [N={n}] or {list(utility.shape)}, got {tuple(information.shape)}")
        z = information_score(information, kernel=config.info_kernel, power=config.info_power).to(utility.device)
        extra = prior + info * z                                                     # [N] or [L, Hkv, N]
    if info or prior:
        utility = utility + extra * utility.mean(-1, keepdim=True)
    plan = allocate(utility[..., s:], costs, budget_bytes - sink_bytes, protected=protected,
                    layer_distortion=layer_dist, floor=config.floor, spread=config.spread,
                    lift=config.lift, band_protected=band_protected)
    timings["allocate_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    store = PagedStore(tierset, plan.pages.sum((0, 1)).tolist(), num_layers=len(keys), num_kv_heads=hkv,
                       device=keys[0].device, debug=config.debug)
    sink_drop = torch.full((hkv, s), len(tierset), dtype=plan.tiers.dtype)      # not in the store
    for layer, (k, v) in enumerate(zip(keys, values)):
        store.write_plan(layer, k, v, torch.cat([sink_drop, plan.tiers[layer]], -1) if s else plan.tiers[layer])
    timings["store_s"] = time.perf_counter() - t3
    assert store.bytes().stored_bytes == plan.stored_bytes
    res = RetentionResult(plan, store, tierset, utility, n, budget_fraction, full, stats, timings,
                          sink_k=[k[:, :s].to(torch.bfloat16) for k in keys] if s else None,
                          sink_v=[v[:, :s].to(torch.bfloat16) for v in values] if s else None)
    res.calibration = (tierset, stats, layer_dist)
    return res


def ada_tierset(head_dim: int = 64, page_size: int = 64) -> TierSet:
    """``dense`` > ``sphkv-8`` > ``sphkv-4`` > ``sphkv-3`` (uncalibrated).

    Chosen by measurement on SmolLM2-135M KV (2K essay tokens, attention-output error of the next
    64 queries): with ``sphkv-8`` between dense and ``sphkv-4`` this set beats the grid tiers
    {16, 8, 4, 2} at every budget from 5% to 50%; ``TierSet.default()`` (dense / sphkv-4 /
    sphkv-2) loses to them at 50% and its ``sphkv-2`` tier measured worse than dropping.
    """
    def mk(name: str) -> Tier:
        return Tier(name, SphKVConfig.from_name(name, head_dim=head_dim, page_size=page_size,
                                                value_group=min(64, head_dim)))

    return TierSet((Tier("dense"), mk("sphkv-8"), mk("sphkv-4"), mk("sphkv-3")), head_dim=head_dim, page_size=page_size)


def ada_b_tierset(head_dim: int = 64, page_size: int = 64) -> TierSet:
    """``sphkv-8`` > ``sphkv-5b`` > ``sphkv-4b`` > ``sphkv-3b`` > ``sphkv-2b`` (uncalibrated).

    The tuned presets (bits moved from values to keys) at one page size; ``sphkv-2b`` (~2.5 bits) is
    the floor. No dense tier: protected tokens (sinks, recent window) sit in ``sphkv-8`` pages (8 bits,
    near lossless), so protecting 36 tokens costs half a dense page per (layer, kv head) — at a 25%
    budget of a 2K context a dense page alone is 12.5% of it.
    """
    def mk(name: str) -> Tier:
        return Tier(name, SphKVConfig.from_name(name, head_dim=head_dim, page_size=page_size,
                                                value_group=min(64, head_dim)))

    return TierSet(tuple(mk(n) for n in ("sphkv-8", "sphkv-5b", "sphkv-4b", "sphkv-3b", "sphkv-2b")),
                   head_dim=head_dim, page_size=page_size)


def ada_c_tierset(head_dim: int = 64, page_size: int = 64) -> TierSet:
    """:func:`ada_b_tierset` with ``sphkv-4b-a3.5`` between ``sphkv-4b`` and ``sphkv-3b`` (uncalibrated).

    ``sphkv-4b-a3.5`` is ``sphkv-4b`` with 3.5 instead of 4 angle bits per key coordinate (values unchanged;
    3.76 bits per element at head_dim 64, against 4.01 and 3.01): just under the sphkv-4b rate a band plan
    moves ~1/6 of the tokens a quarter bit down instead of ~1/24 of them a whole bit (to ``sphkv-3b``).
    """
    def mk(name: str, **over) -> Tier:
        return Tier(name, SphKVConfig.from_name(name.split("-a")[0], head_dim=head_dim, page_size=page_size,
                                                value_group=min(64, head_dim), **over))

    a35 = mk("sphkv-4b-a3.5", level_bits=optimal_level_bits(head_dim, 3.5))
    return TierSet((mk("sphkv-8"), mk("sphkv-5b"), mk("sphkv-4b"), a35, mk("sphkv-3b"), mk("sphkv-2b")),
                   head_dim=head_dim, page_size=page_size)


def ada_lo_tierset(head_dim: int = 64, page_size: int = 64) -> TierSet:
    """``sphkv-8`` > ``sphkv-2b`` > ``sphkv-2b-lo`` (uncalibrated): below the floor, keep more tokens at ~2.2–2.5
    bits instead of fewer at 4–5 (protected tokens at ``sphkv-8``)."""
    def mk(name: str) -> Tier:
        return Tier(name, SphKVConfig.from_name(name, head_dim=head_dim, page_size=page_size,
                                                value_group=min(64, head_dim)))

    return TierSet(tuple(mk(n) for n in ("sphkv-8", "sphkv-2b", "sphkv-2b-lo")), head_dim=head_dim,
                   page_size=page_size)


def ada_3b_tierset(head_dim: int = 64, page_size: int = 64) -> TierSet:
    """``sphkv-3b`` only (uncalibrated): eviction at ~3 bits (protected tokens at ``sphkv-3b`` too)."""
    tier = Tier("sphkv-3b", SphKVConfig.from_name("sphkv-3b", head_dim=head_dim, page_size=page_size,
                                                  value_group=min(64, head_dim)))
    return TierSet((tier,), head_dim=head_dim, page_size=page_size)


def rdkv_tierset(head_dim: int = 64, page_size: int = 64) -> TierSet:
    """RDKV-style grid tiers ``bf16`` > ``int8`` > ``int4`` > ``int2`` (uncalibrated)."""
    return grid_tierset((16, 8, 4, 2), head_dim=head_dim, page_size=page_size)


def eviction_tierset(head_dim: int = 64, page_size: int = 64) -> TierSet:
    """``dense`` only (calibrated by definition): RDR as pure eviction."""
    return TierSet((Tier("dense"),), head_dim=head_dim, page_size=page_size, distortion=(0.0,))


VARIANTS = {"ada+rdr": ada_tierset, "ada-b+rdr": ada_b_tierset, "ada-c+rdr": ada_c_tierset, "ada-lo+rdr": ada_lo_tierset, "ada-3b+rdr": ada_3b_tierset, "rdkv": rdkv_tierset,
            "dense+rdr": eviction_tierset}
def compress_variant(name: str, keys, values, queries, budget_fraction: float, *,
                     config: RetentionConfig = RetentionConfig(), page_size: int = 64,
                     sm_scale: float | None = None, q_positions: torch.Tensor | None = None,
                     calibration=None, information=None) -> RetentionResult:
    """:func:`compress_prefill` with the tier set of ``VARIANTS[name]``."""
    if name not in VARIANTS:
        raise ValueError(f"variant={name!r} is not registered; allowed: {sorted(VARIANTS)}")
    head_dim = _strip(keys[0], "keys").shape[-1]
    return compress_prefill(keys, values, queries, VARIANTS[name](head_dim, page_size), budget_fraction,
                            config=config, sm_scale=sm_scale, q_positions=q_positions, calibration=calibration,
                            information=information)
