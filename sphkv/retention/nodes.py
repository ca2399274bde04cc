# SPDX-License-Identifier: Apache-2.0
"""Rate-distortion allocation over whole cache nodes (e.g. SGLang radix-tree nodes): a pure function.

Each node ``k`` can be held at one of ``T`` tiers (0 most precise) or evicted (index ``T``). Holding it
at tier ``t`` costs ``node_bytes[k, t]`` bytes and ``reuse[k] × distortion[k, t]`` expected distortion
(``distortion[k, T]`` is the eviction cost, e.g. the node's token count × the calibrated drop
distortion; ``reuse`` its expected number of future hits). :func:`plan_nodes` picks tiers minimizing
``Σ reuse·distortion`` under ``Σ bytes ≤ budget``; locked nodes (read by a running request) keep their
``current`` tier and their bytes are charged first. Every sharer of a node reads the same bytes, so the
decision is per node, not per request.

Solver: Lagrangian (each unlocked node takes ``argmin reuse·D + λ·bytes``, ``λ`` bisected to fit), then a
greedy repair on exact bytes (demote the move with the least distortion added per byte saved while over
budget; promote the most distortion removed per byte while one fits) from both sides of the final ``λ``,
and the uniform guard: the answer
is never worse than holding every unlocked node at one tier ``t`` (each ``t`` that fits). When the byte
counts share a unit that makes the problem small (e.g. bytes counted in pages), an exact multiple-choice
knapsack DP runs as well and the better answer wins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["NodePlan", "plan_nodes"]


@dataclass(frozen=True)
class NodePlan:
    """``tiers`` ``[K]`` int64 (``num_tiers`` = evicted); exact ``stored_bytes``; ``objective`` = Σ reuse·D."""

    tiers: torch.Tensor
    stored_bytes: int
    budget_bytes: int
    objective: float
    num_tiers: int
    source: str                 # "rdr", "exact" or "uniform:<t>"

    def evicted(self) -> torch.Tensor:
        return self.tiers == self.num_tiers

    def bytes_per_tier(self, node_bytes: torch.Tensor) -> list[int]:
        """Stored bytes held at each tier (``num_tiers`` entries)."""
        nb = torch.as_tensor(node_bytes, dtype=torch.int64)
        out = []
        for t in range(self.num_tiers):
            sel = self.tiers == t
            out.append(int(nb[sel, t].sum()))
        return out


def _check(node_bytes, distortion, reuse, locked, current):
    nb = torch.as_tensor(node_bytes, dtype=torch.int64).cpu()
    if nb.dim() != 2 or nb.shape[1] < 1:
        raise ValueError(f"node_bytes must be [K, T>=1], got {tuple(nb.shape)}")
    k, t = nb.shape
    d = torch.as_tensor(distortion, dtype=torch.float64).cpu()
    if d.shape != (k, t + 1):
        raise ValueError(f"distortion must be [K={k}, T+1={t + 1}] (the last column is eviction), got {tuple(d.shape)}")
    if bool((nb < 0).any()) or bool((nb[:, 1:] > nb[:, :-1]).any()):
        raise ValueError("node_bytes must be >= 0 and nonincreasing along tiers")
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()) or bool((d[:, 1:] < d[:, :-1]).any()):
        raise ValueError("distortion must be finite, >= 0 and nondecreasing along tiers (eviction last)")
    r = torch.as_tensor(reuse, dtype=torch.float64).cpu()
    if r.shape != (k,) or not bool(torch.isfinite(r).all()) or bool((r < 0).any()):
        raise ValueError(f"reuse must be [K={k}], finite and >= 0")
    lk = torch.zeros(k, dtype=torch.bool) if locked is None else torch.as_tensor(locked, dtype=torch.bool).cpu()
    cur = torch.zeros(k, dtype=torch.int64) if current is None else torch.as_tensor(current, dtype=torch.int64).cpu()
    if lk.shape != (k,) or cur.shape != (k,):
        raise ValueError(f"locked and current must be [K={k}]")
    if bool((lk & ((cur < 0) | (cur >= t))).any()):
        raise ValueError(f"a locked node must be held at a tier 0..{t - 1} (locked nodes are never evicted)")
    return nb, d, r, lk, cur


def plan_nodes(node_bytes, distortion, reuse, budget_bytes: int, *, locked=None, current=None,
               max_states: int = 2_000_000) -> NodePlan:
    """Tier (or evict) every unlocked node under ``budget_bytes``; see the module docstring.

    Parameters
    ----------
    node_bytes : ``[K, T]`` int — exact bytes of node ``k`` at tier ``t``, nonincreasing along tiers.
    distortion : ``[K, T+1]`` float — distortion of node ``k`` at each tier, eviction last (nondecreasing).
    reuse : ``[K]`` float ≥ 0 — expected future reuse (weights the distortion).
    locked : ``[K]`` bool — nodes a running request reads: kept at ``current`` (never evicted).
    current : ``[K]`` int — current tiers (default 0).
    max_states : when ``free nodes × (tiers + 1) × budget / g`` ≤ this (``g`` the gcd of every byte
        count), an exact dynamic program over the budget in units of ``g`` also runs and its answer is
        taken when better (``source == "exact"``); e.g. budgets counted in pages.

    Raises
    ------
    ValueError
        on malformed inputs, or when the locked nodes alone exceed the budget (naming both numbers).

    Examples
    --------
    >>> nb = torch.tensor([[400, 100], [400, 100], [400, 100]])
    >>> d = torch.tensor([[0.0, 0.1, 1.0]] * 3)
    >>> p = plan_nodes(nb, d, torch.tensor([5.0, 1.0, 0.01]), 600, locked=torch.tensor([False, False, True]))
    >>> p.tiers.tolist(), p.stored_bytes <= 600
    ([1, 1, 0], True)
    """
    nb, d, r, lk, cur = _check(node_bytes, distortion, reuse, locked, current)
    k, t = nb.shape
    budget = int(math.floor(budget_bytes))
    nbe = torch.cat([nb, torch.zeros(k, 1, dtype=torch.int64)], 1)                 # eviction costs 0 bytes
    cost = r[:, None] * d                                                          # [K, T+1]
    locked_bytes = int(nbe[lk, cur[lk]].sum()) if bool(lk.any()) else 0
    if locked_bytes > budget:
        raise ValueError(f"budget_bytes={budget_bytes!r} is below the {locked_bytes} bytes of the locked nodes")
    free = ~lk

    def total(tiers):
        return int(nbe.gather(1, tiers[:, None]).sum()), float(cost.gather(1, tiers[:, None]).sum())

    def lagrange(lam):
        tiers = (cost + lam * nbe.to(torch.float64)).argmin(1)
        return torch.where(lk, cur, tiers)

    tiers = lagrange(0.0)
    starts = []
    if total(tiers)[0] > budget:
        lo, hi = 0.0, 1e-12
        while total(lagrange(hi))[0] > budget and hi < 1e300:
            lo, hi = hi, hi * 4
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if total(lagrange(mid))[0] > budget else (lo, mid)
        tiers = lagrange(hi)
        starts.append(lagrange(lo))                     # the infeasible side, repaired down: a second start
    best, source = _repair(tiers, nbe, cost, free, budget, t), "rdr"
    best_obj = total(best)[1]
    for s0 in starts:
        cand = _repair(s0, nbe, cost, free, budget, t)
        if total(cand)[1] < best_obj:
            best, best_obj = cand, total(cand)[1]
    for u in range(t + 1):                                                         # uniform guard
        cand = torch.where(lk, cur, torch.full_like(cur, u))
        if total(cand)[0] > budget:
            continue
        cand = _repair(cand, nbe, cost, free, budget, t)
        obj = total(cand)[1]
        if obj < best_obj - 1e-12 * max(abs(best_obj), 1.0):
            best, best_obj, source = cand, obj, f"uniform:{u}"
    exact = _exact(nbe, cost, free, budget - locked_bytes, max_states)
    if exact is not None:
        cand = torch.where(lk, cur, exact)
        obj = total(cand)[1]
        if total(cand)[0] <= budget and obj < best_obj - 1e-12 * max(abs(best_obj), 1.0):
            best, best_obj, source = cand, obj, "exact"
    stored, obj = total(best)
    assert stored <= budget and bool((best[lk] == cur[lk]).all())
    return NodePlan(best, stored, budget, obj, t, source)


def _repair(tiers, nbe, cost, free, budget, t):
    """Greedy single-step moves on exact bytes: shrink below the budget, then improve while a move fits."""
    tiers = tiers.clone()
    idx = torch.arange(tiers.numel())
    used = int(nbe[idx, tiers].sum())
    while True:
        cur_b, cur_c = nbe[idx, tiers], cost[idx, tiers]
        if used > budget:
            nxt = (tiers + 1).clamp_max(t)                                         # demote one step (or evict)
            db = (cur_b - nbe[idx, nxt]).to(torch.float64)
            dc = cost[idx, nxt] - cur_c
            ok = free & (nxt != tiers) & (db > 0)
            if not bool(ok.any()):
                raise RuntimeError("cannot shrink below the budget (internal error)")
            score = torch.where(ok, dc / db, torch.full_like(dc, math.inf))
            j = int(score.argmin())
            tiers[j] = nxt[j]
            used -= int(db[j])
            continue
        prv = (tiers - 1).clamp_min(0)                                             # promote one step
        db = (nbe[idx, prv] - cur_b).to(torch.float64)
        gain = cur_c - cost[idx, prv]
        ok = free & (prv != tiers) & (gain > 0) & (db <= budget - used)
        if not bool(ok.any()):
            return tiers
        score = torch.where(ok, gain / db.clamp_min(1.0), torch.full_like(gain, -math.inf))
        j = int(score.argmax())
        tiers[j] = prv[j]
        used += int(db[j])


def _exact(nbe, cost, free, capacity, max_states):
    """Exact multiple-choice knapsack over the free nodes (``None`` when too large): tiers ``[K]``."""
    import functools

    idx = free.nonzero().flatten()
    if capacity < 0 or idx.numel() == 0:
        return None
    vals = [int(x) for x in nbe[idx].flatten().tolist() if x > 0] + ([capacity] if capacity > 0 else [])
    g = functools.reduce(math.gcd, vals, 0) or 1
    cap = capacity // g
    k, t1 = idx.numel(), nbe.shape[1]
    if k * t1 * (cap + 1) > max_states:
        return None
    w = (nbe[idx] // g).tolist()
    c = cost[idx]
    dp = torch.zeros(cap + 1, dtype=torch.float64)                  # dp[j]: min cost with ≤ j units used
    choice = torch.zeros(k, cap + 1, dtype=torch.int64)
    inf = torch.full((cap + 1,), math.inf, dtype=torch.float64)
    for i in range(k):
        best = inf.clone()
        arg = torch.zeros(cap + 1, dtype=torch.int64)
        for t in range(t1):
            wt = w[i][t]
            if wt > cap:
                continue
            cand = inf.clone()
            cand[wt:] = dp[: cap + 1 - wt] + c[i, t]
            better = cand < best
            best = torch.where(better, cand, best)
            arg = torch.where(better, torch.full_like(arg, t), arg)
        dp, choice[i] = best, arg
    if not math.isfinite(float(dp[cap])):
        return None
    tiers = torch.zeros(nbe.shape[0], dtype=torch.int64)
    j = cap
    for i in range(k - 1, -1, -1):
        t = int(choice[i, j])
        tiers[idx[i]] = t
        j -= w[i][t]
    return tiers
