# SPDX-License-Identifier: Apache-2.0
"""Budgeted allocation: tier or drop for every (token, layer, kv head), at page granularity.

Minimize ``Σ u·D(tier)`` subject to ``Σ stored bytes ≤ budget``, where ``u`` is the utility
(expected attention mass, :mod:`sphkv.retention.utility`), ``D`` the calibrated tier distortion
(dense 0, drop 1, :mod:`sphkv.retention.calibration`) and stored bytes are exact page bytes: a
(layer, kv head) keeping ``c`` tokens of tier ``t`` occupies ``ceil(c / P)`` pages of
``page_bytes[t]`` (arena bytes + ``PAGE_META_BYTES``), partial pages counted whole.

Within a (layer, kv head) the optimum keeps the highest-utility tokens at the most precise tiers
(distortion is nondecreasing along tiers), so a head's plan is a set of boundaries over its
tokens sorted by utility. The solver:

1. Lagrangian: each token takes ``argmin_t u·D(t) + λ·bytes_per_token(t)`` (lower envelope of
   lines in ``u``: thresholds scale with ``λ``); bisect ``λ`` until the amortized bytes fit.
2. Page rounding: round each tier's count down to whole pages (the remainder moves one tier
   down, the last tier's remainder is dropped); protected tokens stay at tier 0.
3. Greedy fix-up on the exact packed bytes: while over budget, apply the move (demote a partial
   page or one page to the next tier, or drop one) with the least distortion per byte saved;
   then, while any move fits, apply the one with the most distortion removed per byte spent
   (filling partial pages is free). The result is ``≤ budget`` exactly, with no single
   page-sized move left that fits and helps.

Per-layer and per-head budgets fall out of the single global ``λ`` (no per-layer setting).

Two safeguards (what makes the plan robust when the utility is only an estimate):

* **Per-layer distortion** (``layer_distortion`` ``[L, T]``): each layer's tiers carry their own
  calibrated distortion; the Lagrangian thresholds and the fix-up use the layer's row.
* **Floor** (``floor=True``): when the budget holds every token at the least precise tier (protected
  tokens at tier 0), nothing is dropped — the Lagrangian has no drop option, the last tier rounds up
  to whole pages and the fix-up makes no drop move; tokens are dropped only when the floor does not fit.
* **Uniform guard** (always): the plan is compared, on the allocator's own objective, with every
  *uniform* plan that fits (protected tokens at tier 0, all others at one tier ``t``), each improved
  by the same greedy fix-up; the best of them is returned. So the answer is never worse on the
  objective than the best uniform tier that fits the budget (``Plan.source`` says which won).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from ..tiers import TierSet
from .fixup import fixup

__all__ = ["TierCosts", "Plan", "allocate", "band_tiers", "bf16_bytes", "budget_from_fraction", "uniform_plans"]


@dataclass(frozen=True)
class TierCosts:
    """Exact page bytes and calibrated distortion of each tier (most precise first); drop is implicit.

    Examples
    --------
    >>> TierCosts(("dense", "low"), (16392, 2440), (0.0, 0.3), page_size=64).token_bytes
    (256.125, 38.125)
    """

    names: tuple[str, ...]
    page_bytes: tuple[int, ...]
    distortion: tuple[float, ...]
    page_size: int
    drop_distortion: float = 1.0

    def __post_init__(self) -> None:
        t = len(self.names)
        if t == 0 or len(self.page_bytes) != t or len(self.distortion) != t:
            raise ValueError(f"names, page_bytes, distortion must have one entry per tier, got "
                             f"{len(self.names)}, {len(self.page_bytes)}, {len(self.distortion)}")
        if self.page_size < 1:
            raise ValueError(f"page_size={self.page_size!r} must be >= 1")
        if any(b <= 0 for b in self.page_bytes) or any(a <= b for a, b in zip(self.page_bytes, self.page_bytes[1:])):
            raise ValueError(f"page_bytes={self.page_bytes!r} must be positive and strictly decreasing")
        d = self.distortion
        if any(not math.isfinite(x) or x < 0 for x in d) or any(a > b for a, b in zip(d, d[1:])):
            raise ValueError(f"distortion={d!r} must be finite, >= 0 and nondecreasing along tiers")
        if not math.isfinite(self.drop_distortion) or self.drop_distortion <= 0:
            raise ValueError(f"drop_distortion={self.drop_distortion!r} must be finite and > 0")

    @property
    def num_tiers(self) -> int:
        return len(self.names)

    @property
    def token_bytes(self) -> tuple[float, ...]:
        """Amortized bytes per token of a full page."""
        return tuple(b / self.page_size for b in self.page_bytes)

    @classmethod
    def from_tierset(cls, tierset: TierSet) -> "TierCosts":
        """Costs of a calibrated :class:`TierSet` (``distortion`` filled; see ``calibrate``)."""
        if not tierset.distortion:
            raise ValueError("tierset.distortion is empty: calibrate the tiers first (sphkv.retention.calibrate)")
        return cls(tuple(t.name for t in tierset.tiers), tuple(tierset.page_bytes()),
                   tuple(float(x) for x in tierset.distortion), tierset.page_size)


def bf16_bytes(num_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of the full bf16 cache (K and V) without any metadata."""
    return num_tokens * num_layers * num_kv_heads * head_dim * 2 * 2


def budget_from_fraction(fraction: float, num_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """``floor(fraction × bf16 bytes)``; ``fraction`` must be finite and > 0."""
    if not isinstance(fraction, numbers.Real) or not math.isfinite(fraction) or fraction <= 0:
        raise ValueError(f"budget fraction={fraction!r} must be a finite number > 0")
    return int(math.floor(fraction * bf16_bytes(num_tokens, num_layers, num_kv_heads, head_dim)))


@dataclass(frozen=True)
class Plan:
    """An allocation. ``tiers`` ``[L, Hkv, N]`` int8: tier index per token, ``num_tiers`` = dropped.

    ``counts``/``pages`` ``[L, Hkv, T]`` int64; ``stored_bytes`` is exact (``Σ pages × page_bytes``).
    """

    tiers: torch.Tensor
    counts: torch.Tensor
    pages: torch.Tensor
    stored_bytes: int
    budget_bytes: int
    min_bytes: int
    lam: float
    expected_distortion: float
    costs: TierCosts = field(repr=False)
    source: str = "rdr"                 # "rdr", or "uniform:<tier>" when a uniform plan (+ fix-up) won
    floor: bool = False                 # True when the floor held (no drop was allowed)

    @property
    def drop(self) -> int:
        return self.costs.num_tiers

    def kept(self) -> torch.Tensor:
        """``[L, Hkv, N]`` bool."""
        return self.tiers < self.drop

    def bytes_per_head(self) -> torch.Tensor:
        """``[L, Hkv]`` int64 stored bytes."""
        return (self.pages * torch.tensor(self.costs.page_bytes)).sum(-1)

    def bytes_per_layer(self) -> torch.Tensor:
        return self.bytes_per_head().sum(-1)

    def summary(self) -> dict:
        c = self.counts.sum((0, 1))
        n = self.tiers.numel()
        return dict(stored_bytes=self.stored_bytes, budget_bytes=self.budget_bytes, min_bytes=self.min_bytes,
                    lam=self.lam, expected_distortion=self.expected_distortion, source=self.source,
                    floor=self.floor,
                    tokens_per_tier={name: int(x) for name, x in zip(self.costs.names, c)},
                    dropped=int(n - c.sum()), pages_per_tier=[int(x) for x in self.pages.sum((0, 1))])


# -- Lagrangian ----------------------------------------------------------------------------------------
def _hull(d: list[float], token_bytes: tuple[float, ...]) -> list[tuple[int, float]]:
    """Lower envelope (at ``λ = 1``) of ``u ↦ D_o·u + bytes_o`` over tiers + drop.

    ``d``: distortion of each tier then of drop. Returns ``[(option, lower_threshold)]`` from the most
    precise option down to drop: option ``o`` wins for ``u ≥ λ·lower_threshold`` (and below the
    previous one's threshold).
    """
    b = list(token_bytes) + [0.0]
    cur = max(i for i in range(len(d)) if d[i] == d[0])
    hull = []
    while cur != len(d) - 1:
        cross = [((b[cur] - b[j]) / (d[j] - d[cur]), j) for j in range(cur + 1, len(d)) if d[j] > d[cur]]
        u, nxt = max(cross)
        hull.append((cur, u))
        cur = nxt
    hull.append((cur, 0.0))
    return hull


def _lagrangian_bounds(keys_asc: torch.Tensor, hull, lam: float, t: int, n_prot: torch.Tensor) -> torch.Tensor:
    """Boundaries ``A`` ``[G, T+1]`` (tier ``t`` = sorted ranks ``A[:, t]..A[:, t+1]``) for ``λ``."""
    g, n = keys_asc.shape
    thr = torch.tensor([lam * u for _, u in hull], dtype=keys_asc.dtype).expand(g, -1).contiguous()
    ends = n - torch.searchsorted(keys_asc, thr, side="left")                 # [G, K]: ranks with key ≥ thr
    a = torch.zeros(g, t + 1, dtype=torch.int64)
    last = torch.zeros(g, dtype=torch.int64)
    hull_end = {opt: ends[:, i] for i, (opt, _) in enumerate(hull)}
    for tier in range(t):
        last = hull_end.get(tier, last)
        a[:, tier + 1] = last
    a[:, 1] = torch.maximum(a[:, 1], n_prot)
    return torch.cummax(a, 1).values


# -- exact costs of boundaries --------------------------------------------------------------------------
def _cost(a: torch.Tensor, s: torch.Tensor, pb: torch.Tensor, dist: torch.Tensor, page: int):
    """Exact ``(bytes, distortion)`` of boundaries ``a`` ``[G, T+1]``; ``dist`` ``[G, T+1]`` (drop last).

    ``s`` ``[G, N+1]`` float64 holds suffix sums of the utilities sorted descending
    (``s[r] = Σ_{j ≥ r} u_j``, summed from the small end so that tails of tiny utilities keep
    their precision).
    """
    c = a[:, 1:] - a[:, :-1]                                                  # [G, T]
    nbytes = ((c + page - 1) // page * pb).sum(-1)
    sa = torch.gather(s, 1, a)                                                # [G, T+1]
    seg = sa[:, :-1] - sa[:, 1:]
    return nbytes, (seg * dist[:, :-1]).sum(-1) + dist[:, -1] * sa[:, -1]


# -- entry point ----------------------------------------------------------------------------------------
def _validate(utility: torch.Tensor, protected: torch.Tensor) -> None:
    bad = ~torch.isfinite(utility) & ~protected
    if bool(bad.any()) or bool(((utility < 0) & ~protected).any()):
        raise ValueError("utility must be finite and >= 0 for unprotected tokens "
                         f"({int(bad.sum())} non-finite, {int(((utility < 0) & ~protected).sum())} negative)")


def _layer_dist(costs: TierCosts, layer_distortion, l: int) -> torch.Tensor:
    """``[L, T]`` float64 tier distortions per layer (validated), or the tier set's row repeated."""
    if layer_distortion is None:
        return torch.tensor(costs.distortion, dtype=torch.float64).expand(l, -1).clone()
    d = torch.as_tensor(layer_distortion, dtype=torch.float64).cpu()
    if d.shape != (l, costs.num_tiers):
        raise ValueError(f"layer_distortion must be [L={l}, T={costs.num_tiers}], got {tuple(d.shape)}")
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()) or bool((d[:, 1:] < d[:, :-1]).any()):
        raise ValueError("layer_distortion must be finite, >= 0 and nondecreasing along tiers in every layer")
    return d


def uniform_plans(n_prot: torch.Tensor, n: int, num_tiers: int) -> list[torch.Tensor]:
    """Boundaries ``[G, T+1]`` of the uniform plans: protected tokens at tier 0, every other token at tier ``t``."""
    out = []
    for t in range(num_tiers):
        a = torch.empty(n_prot.shape[0], num_tiers + 1, dtype=torch.int64)
        a[:, 0] = 0
        a[:, 1:t + 1] = n_prot[:, None]
        a[:, t + 1:] = n
        if t == 0:
            a[:, 1:] = n
        out.append(a)
    return out


def band_tiers(n_prot: torch.Tensor, n: int, page_bytes: tuple[int, ...], page: int, budget: int,
               spread: int, lift: int = 0) -> tuple[int, int] | None:
    """``(top, floor)`` tier indices of the band, or ``None`` when no uniform tier fits ``budget``.

    ``floor`` is the most precise tier ``t`` such that the plan "protected tokens at ``max(top - lift, 0)``
    with ``top = max(t - spread, 0)``, every other token at ``t``" fits (exact packed bytes over the ``G``
    rows of ``n_prot`` ``[G]``; protected tokens share pages with the others only at the same tier);
    the band is tiers ``top..floor``.
    """
    for name, x in (("spread", spread), ("lift", lift)):
        if not isinstance(x, int) or isinstance(x, bool) or x < 0:
            raise ValueError(f"{name}={x!r} must be an int >= 0")
    for t in range(len(page_bytes)):
        top = max(t - spread, 0)
        ptier = max(top - lift, 0)
        if ptier == t:
            nbytes = -(-n // page) * page_bytes[t] * n_prot.numel()
        else:
            nbytes = int(((n_prot + page - 1) // page * page_bytes[ptier]
                          + (n - n_prot + page - 1) // page * page_bytes[t]).sum())
        if nbytes <= budget:
            return top, t
    return None


def _allocate_band(utility, costs, budget, prot, ldist, spread, lift=0):
    """The band plan (see :func:`allocate`'s ``spread`` and ``lift``), or ``None`` when no uniform tier fits."""
    l, h, n = utility.shape
    band = band_tiers(prot.reshape(l * h, n).sum(1), n, costs.page_bytes, costs.page_size, budget, spread, lift)
    if band is None:
        return None
    top, bottom = band
    ptier, t, page = max(top - lift, 0), costs.num_tiers, costs.page_size
    sub = TierCosts(costs.names[top:bottom + 1], costs.page_bytes[top:bottom + 1],
                    costs.distortion[top:bottom + 1], page, costs.drop_distortion)
    pad = lambda x: torch.cat([x.new_zeros(l, h, top), x, x.new_zeros(l, h, t - bottom - 1)], -1)
    name = f"band:{costs.names[top]}..{costs.names[bottom]}"
    mask = prot[0, 0]
    n_prot = int(mask.sum())
    if ptier == top or n_prot in (0, n):
        inner = allocate(utility, sub, budget, protected=prot, layer_distortion=ldist[:, top:bottom + 1], floor=True)
        tiers = inner.tiers.to(torch.int16) + top
        return Plan(tiers.to(torch.int8), pad(inner.counts), pad(inner.pages), inner.stored_bytes,
                    inner.budget_bytes, inner.min_bytes, inner.lam, inner.expected_distortion, costs,
                    f"{name}/{inner.source}", True)
    if not bool((prot == mask).all()):
        raise ValueError("lift > 0 needs the same protected positions in every (layer, kv head)")
    prot_pages = -(-n_prot // page)
    prot_bytes = l * h * prot_pages * costs.page_bytes[ptier]
    inner = allocate(utility[..., ~mask], sub, budget - prot_bytes, layer_distortion=ldist[:, top:bottom + 1],
                     floor=True)
    tiers = torch.full((l, h, n), ptier, dtype=torch.int16)
    tiers[..., ~mask] = inner.tiers.to(torch.int16) + top
    counts, pages = pad(inner.counts), pad(inner.pages)
    counts[..., ptier] += n_prot
    pages[..., ptier] += prot_pages
    return Plan(tiers.to(torch.int8), counts, pages, inner.stored_bytes + prot_bytes, budget,
                l * h * prot_pages * costs.page_bytes[0], inner.lam, inner.expected_distortion, costs,
                f"{name}+protected:{costs.names[ptier]}/{inner.source}", True)


def allocate(utility: torch.Tensor, costs: TierCosts, budget_bytes: float, *,
             protected: torch.Tensor | None = None, layer_distortion=None, floor: bool = False,
             spread: int | None = None, lift: int = 0, band_protected: torch.Tensor | None = None) -> Plan:
    """Plan tiers for ``utility`` ``[L, Hkv, N]`` (float, ≥ 0) under ``budget_bytes`` (exact packed bytes).

    Parameters
    ----------
    protected : ``[N]`` or ``[L, Hkv, N]`` bool — tokens forced to tier 0 (sinks, recent window).
    layer_distortion : ``[L, T]`` — per-layer tier distortions (default: ``costs.distortion`` everywhere).
    floor : drop nothing while the budget holds every token at the least precise tier.
    spread : the band (trust region around the uniform rate; ``None``: off). With ``spread = k`` the
        plan uses only the tiers ``top..floor``: ``floor`` is the most precise tier whose uniform plan
        fits with the protected tokens at ``top = max(floor - k, 0)`` (:func:`band_tiers`), protected
        tokens sit at ``top`` instead of tier 0, nothing is dropped, and the allocator (Lagrangian,
        fix-up, uniform guard) chooses within the band. Every unprotected token is then at least as
        precise as in any uniform plan that fits, so the band plan is never worse than those on the
        objective, and no token is pushed far below the budget's rate on a utility estimate. When no
        uniform tier fits (budget below the floor), ``spread`` is ignored: ``floor`` rules apply.
    lift : with ``spread``, protected tokens sit ``lift`` tiers above the band's top (own pages; at most
        tier 0); the band's floor is then chosen with those bytes counted.
    band_protected : ``[N]`` or ``[L, Hkv, N]`` bool — the protected tokens when the band applies
        (default: ``protected``); e.g. the whole first page, so that the lifted tokens fill their page.

    The returned plan is never worse on the objective ``Σ u·D`` than the best uniform plan that fits
    (see the module docstring).

    Raises
    ------
    ValueError
        when the budget is not a finite number > 0 or is below the bytes the protected tokens need,
        naming the value and the minimum.

    Examples
    --------
    >>> costs = TierCosts(("dense", "low"), (16392, 2440), (0.0, 0.3), page_size=64)
    >>> u = torch.rand(2, 3, 500)
    >>> plan = allocate(u, costs, 200_000, protected=torch.arange(500) < 4)
    >>> plan.stored_bytes <= 200_000, bool((plan.tiers[..., :4] == 0).all())
    (True, True)
    """
    if utility.dim() != 3 or utility.shape[-1] < 1:
        raise ValueError(f"utility must be [L, Hkv, N>=1], got {tuple(utility.shape)}")
    l, h, n = utility.shape
    t, page = costs.num_tiers, costs.page_size
    prot = torch.zeros(n, dtype=torch.bool) if protected is None else protected.to(torch.bool).cpu()
    prot = prot.expand(l, h, n).reshape(l * h, n)
    u = utility.detach().to(torch.float64).cpu().reshape(l * h, n)
    _validate(u, prot)
    ldist = _layer_dist(costs, layer_distortion, l)                                 # [L, T]
    n_prot = prot.sum(1)
    pb = torch.tensor(costs.page_bytes, dtype=torch.int64)
    min_bytes = int(((n_prot + page - 1) // page).sum()) * costs.page_bytes[0]
    if not isinstance(budget_bytes, numbers.Real) or not math.isfinite(budget_bytes) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes={budget_bytes!r} must be a finite number > 0 (minimum for the "
                         f"{int(n_prot.sum())} protected tokens: {min_bytes})")
    if budget_bytes < min_bytes:
        raise ValueError(f"budget_bytes={budget_bytes!r} is below the minimum {min_bytes}: the {int(n_prot.sum())} "
                         f"protected tokens (sinks + recent window) need whole pages of tier {costs.names[0]!r}")
    budget = int(math.floor(budget_bytes))
    if spread is not None:
        bprot = prot if band_protected is None else band_protected.to(torch.bool).cpu().expand(l, h, n)
        banded = _allocate_band(utility, costs, budget, bprot.reshape(l, h, n), _layer_dist(costs, layer_distortion, l),
                                spread, lift)
        if banded is not None:
            return banded
    keys = torch.where(prot, torch.full_like(u, math.inf), u)
    keys_sorted, order = keys.sort(dim=1, descending=True, stable=True)            # [G, N]
    keys_asc = keys_sorted.flip(1).contiguous()
    finite_asc = torch.where(torch.isinf(keys_asc), 0.0, keys_asc)
    s = torch.cat([finite_asc.cumsum(1).flip(1), torch.zeros(l * h, 1, dtype=torch.float64)], 1)
    uniform = uniform_plans(n_prot, n, t)
    floor_bytes = int(((uniform[-1][:, 1:] - uniform[-1][:, :-1] + page - 1) // page * pb).sum())
    use_floor = bool(floor) and floor_bytes <= budget
    true_dist = torch.cat([ldist, torch.full((l, 1), costs.drop_distortion, dtype=torch.float64)], 1)  # [L, T+1]
    gdist = true_dist.repeat_interleave(h, 0)                                       # [G, T+1]
    tb = torch.tensor(costs.token_bytes, dtype=torch.float64)
    hull_dist = true_dist.clone()
    if use_floor:
        hull_dist[:, -1] = math.inf                                                 # no drop option
    hulls = [_hull(hull_dist[i].tolist(), costs.token_bytes) for i in range(l)]

    def amortized(lam):
        a = torch.cat([_lagrangian_bounds(keys_asc[i * h:(i + 1) * h], hulls[i], lam, t, n_prot[i * h:(i + 1) * h])
                       for i in range(l)])
        return a, float(((a[:, 1:] - a[:, :-1]).to(torch.float64) * tb).sum())

    lam, (a, used) = 0.0, amortized(0.0)
    if used > budget:
        lo, hi = 0.0, 1e-12 * float(u.max().clamp_min(1e-30)) * max(tb.max().item(), 1)
        while amortized(hi)[1] > budget and hi < 1e300:
            lo, hi = hi, hi * 4
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if amortized(mid)[1] > budget else (lo, mid)
        lam = hi
        a, used = amortized(hi)
    # page rounding: whole pages only (the remainder moves one tier down; protected stay)
    for i in range(t):
        c = a[:, i + 1] - a[:, i]
        floor_end = a[:, i] + c // page * page
        a[:, i + 1] = torch.maximum(floor_end, n_prot) if i == 0 else floor_end
    a = torch.cummax(a, 1).values
    if use_floor:
        a[:, -1] = n                                                                # the floor: keep every token
    drop_ok = not use_floor
    a = fixup(a, s, n_prot, list(costs.page_bytes), gdist.tolist(), page, budget, allow_drop=drop_ok)
    best, source = a, "rdr"
    best_d = float(_cost(a, s, pb, gdist, page)[1].sum())
    # uniform guard: every uniform plan that fits, improved by the same fix-up, competes on the objective
    for i, ua in enumerate(uniform):
        if int(_cost(ua, s, pb, gdist, page)[0].sum()) > budget:
            continue
        ua = fixup(ua.clone(), s, n_prot, list(costs.page_bytes), gdist.tolist(), page, budget, allow_drop=drop_ok)
        d_u = float(_cost(ua, s, pb, gdist, page)[1].sum())
        if d_u < best_d - 1e-12 * max(abs(best_d), 1.0):
            best, best_d, source = ua, d_u, f"uniform:{costs.names[i]}"
    return _finish(best, order, l, h, n, t, page, pb, true_dist.repeat_interleave(h, 0), s, budget, min_bytes,
                   lam, costs, source, use_floor)


def _finish(a, order, l, h, n, t, page, pb, dist, s, budget, min_bytes, lam, costs, source, use_floor) -> Plan:
    rank = torch.arange(n)[None, :]
    tier_sorted = (rank[:, :, None] >= a[:, None, 1:]).sum(-1)                 # [G, N]: first boundary above rank
    tiers = torch.empty_like(tier_sorted).scatter_(1, order, tier_sorted).to(torch.int8)
    counts = a[:, 1:] - a[:, :-1]
    pages = (counts + page - 1) // page
    nbytes, dcur = _cost(a, s, pb, dist, page)
    stored = int(nbytes.sum())
    assert stored <= budget, (stored, budget)
    return Plan(tiers.reshape(l, h, n), counts.reshape(l, h, t), pages.reshape(l, h, t), stored, budget,
                min_bytes, lam, float(dcur.sum()), costs, source, use_floor)
