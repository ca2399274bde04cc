# SPDX-License-Identifier: Apache-2.0
"""Radix-node retention for the sphkv pool: which unlocked nodes are demoted and which are evicted.

A radix node's span is one retention unit; every request that matches the node reads the same coded
pages, so a decision about the node holds for all its sharers. Locked nodes (``lock_ref > 0``: a
running request reads them) are never offered — the radix cache filters them before asking.

Policies form a registry (``--sphkv-config '{"retention": NAME}'``); each is an SGLang
``EvictionStrategy`` (the stock eviction loop orders evictable leaves by ``get_priority``, lowest
first) and also answers the pool's demotion request (:meth:`NodePolicy.demotion_pages`: the most
precise tier is full and ``num_pages`` new pages must be coded):

``heuristic`` (alias ``reuse``)  utility ``reuse · (1 + mass/tokens)`` per node, where
            ``reuse = (1 + hit_count) · (1 + children) · 0.5^(age / half_life)`` (hit count and
            branching: how many requests share the span; recency: how likely the conversation comes
            back) and ``mass`` the attention probability the span's pages received so far (summed
            over layers, heads, queries); demotion takes the pages of the lowest-utility nodes first.
``rdr``     rate-distortion retention: demotion solves :func:`sphkv.retention.plan_nodes` over every
            unlocked node holding pages of the full tier ``t`` — node ``k`` kept costs ``u_k·n_k·P·D[t]``
            and ``n_k·page_bytes[t]`` of the tier's arena, demoted ``u_k·n_k·P·D[t+1]`` and none (``u_k``
            the heuristic utility above = expected reuse × attention weight, ``n_k`` its pages of tier
            ``t``, ``D`` the per-tier distortion calibrated with :func:`sphkv.retention.measure_tiers`,
            drop = 1) — under the arena's byte budget less the ``num_pages`` pages to code (the pool's
            tiers are separate arenas, so this is the budget that binds); the plan is whole nodes, exact
            (knapsack DP) at these sizes; eviction orders leaves by the distortion an eviction adds per token,
            ``u_k · (1 - D[tier])`` — a node already demoted loses less when dropped.
``lru``     last access time (SGLang's default order), for comparison.

Not done: per-token or per-head drops inside a cold node's pages — a physical page holds all heads of
its tokens at one tier, so such drops would free no bytes in this pool.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch

from sglang.srt.mem_cache.evict_policy import EvictionStrategy

__all__ = ["POLICIES", "NodePolicy", "ReusePolicy", "LRUPolicy", "RDRPolicy", "make_policy", "node_pages",
           "tier_distortion"]


def node_pages(node, page_size: int) -> torch.Tensor:
    """Logical pages ``[k]`` int64 of a radix node's span (its value holds page-aligned slot ids)."""
    value = node.value
    if value is None or len(value) == 0:
        return torch.empty(0, dtype=torch.int64)
    return value[::page_size].to("cpu", torch.int64) // page_size


class NodePolicy(EvictionStrategy):
    """Base: an eviction priority (lower goes first) and a demotion choice over unlocked nodes.

    ``stats`` counts what the policy decided (exported in ``/get_server_info``).
    """

    name = "base"

    def __init__(self, *, page_size: int, mass_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 tier_of: Callable[[torch.Tensor], torch.Tensor] | None = None, half_life_s: float = 60.0, **_):
        self.page_size, self.half_life_s = page_size, half_life_s
        self.mass_of = mass_of if mass_of is not None else (lambda p: torch.zeros(len(p)))
        self.tier_of = tier_of
        self.stats: dict = {}

    def utility(self, node) -> float:
        """Expected reuse × attention weight of ``node`` (see the module docstring)."""
        age = max(0.0, time.monotonic() - node.last_access_time)
        reuse = (1 + node.hit_count) * (1 + len(node.children)) * 0.5 ** (age / self.half_life_s)
        pages = node_pages(node, self.page_size)
        tokens = max(1, pages.numel() * self.page_size)
        mass = float(self.mass_of(pages).sum()) if pages.numel() else 0.0
        return reuse * (1.0 + mass / tokens)

    def get_priority(self, node) -> float:
        return self.utility(node)

    def demotion_pages(self, nodes: Sequence, tier: int, num_pages: int) -> list[tuple[object, list[int]]]:
        """Pages of ``tier`` to re-encode one tier down, grouped by node: ``[(node, pages), ...]``.

        Default: the nodes in ``get_priority`` order (lowest first) until ``num_pages`` are named.
        """
        out, n = [], 0
        for node in sorted(nodes, key=self.get_priority):
            pages = self._pages_at(node, tier)
            if pages:
                out.append((node, pages))
                n += len(pages)
            if n >= num_pages:
                break
        return out

    def _pages_at(self, node, tier: int) -> list[int]:
        pages = node_pages(node, self.page_size)
        if self.tier_of is None or not pages.numel():
            return pages.tolist()
        return pages[self.tier_of(pages) == tier].tolist()


class ReusePolicy(NodePolicy):
    """Today's heuristic: utility = expected reuse × attention mass; see the module docstring.

    Examples
    --------
    >>> class N: hit_count, children, last_access_time, value = 3, {}, time.monotonic(), torch.arange(64)
    >>> ReusePolicy(page_size=64, mass_of=lambda p: torch.zeros(len(p))).get_priority(N()) > 3.9
    True
    """

    name = "heuristic"


class LRUPolicy(NodePolicy):
    """Least recently used first (SGLang's default order), for eviction and demotion."""

    name = "lru"

    def get_priority(self, node) -> float:
        return node.last_access_time


def tier_distortion(tier_names: Sequence[str], *, head_dim: int, page_size: int, seed: int = 0,
                    num_tokens: int = 256) -> tuple[float, ...]:
    """Per-tier distortion (drop = 1, dense = 0; nondecreasing) measured on a seeded Gaussian sample.

    The sample is ``[1, num_tokens, head_dim]`` keys/values and 32 queries at the end (causal); the
    unit is :func:`sphkv.retention.measure_tiers`' attention-output perturbation relative to dropping.

    Examples
    --------
    >>> d = tier_distortion(("sphkv-4", "sphkv-2"), head_dim=64, page_size=64)
    >>> 0.0 < d[0] < d[1] < 1.0
    True
    """
    from sphkv.config import SphKVConfig
    from sphkv.retention import measure_tiers
    from sphkv.tiers import Tier, TierSet

    if num_tokens < page_size or num_tokens % page_size:
        raise ValueError(f"num_tokens={num_tokens!r} must be a positive multiple of page_size={page_size}")
    tiers = tuple(Tier(n, SphKVConfig.from_name(n, head_dim=head_dim, page_size=page_size)) for n in tier_names)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, num_tokens, head_dim, generator=g)
    v = torch.randn(1, num_tokens, head_dim, generator=g)
    q = torch.randn(1, 32, head_dim, generator=g)
    stats = measure_tiers(TierSet(tiers, head_dim=head_dim, page_size=page_size), k, v, q)
    out, run = [], 0.0
    for s in stats:
        run = min(1.0, max(run, s.distortion))
        out.append(run)
    return tuple(out)


class RDRPolicy(NodePolicy):
    """Rate-distortion retention over radix nodes (see the module docstring).

    Parameters
    ----------
    page_bytes : bytes of one logical page (all layers, heads) per tier, most precise first.
    distortion : per-tier distortion (drop = 1), nondecreasing; e.g. :func:`tier_distortion`.

    Examples
    --------
    >>> class N:
    ...     def __init__(self, v, hits): self.value, self.hit_count, self.children = v, hits, {}
    ...     last_access_time = time.monotonic()
    >>> pol = RDRPolicy(page_size=4, page_bytes=(100, 40), distortion=(0.05, 0.2),
    ...                 tier_of=lambda p: torch.zeros(len(p), dtype=torch.int8))
    >>> hot, cold = N(torch.arange(0, 16), 9), N(torch.arange(16, 32), 0)   # 4 pages each
    >>> [(n is cold, p) for n, p in pol.demotion_pages([hot, cold], 0, 3)]
    [(True, [4, 5, 6, 7])]
    """

    name = "rdr"

    def __init__(self, *, page_size: int, page_bytes: Sequence[int], distortion: Sequence[float], **kwargs):
        super().__init__(page_size=page_size, **kwargs)
        pb, d = [int(b) for b in page_bytes], [float(x) for x in distortion]
        if len(pb) != len(d) or not pb:
            raise ValueError(f"page_bytes {pb} and distortion {d} must have one entry per tier")
        if any(b <= 0 for b in pb) or any(b1 > b0 for b0, b1 in zip(pb, pb[1:])):
            raise ValueError(f"page_bytes={pb} must be positive and nonincreasing along tiers")
        if any(not (0.0 <= x <= 1.0) or not math.isfinite(x) for x in d) or any(b < a for a, b in zip(d, d[1:])):
            raise ValueError(f"distortion={d} must be in [0, 1] and nondecreasing along tiers (drop = 1)")
        self.page_bytes, self.distortion = tuple(pb), tuple(d)
        self.stats = dict(rdr_plans=0, rdr_pages_planned=0, rdr_last_objective=0.0, rdr_last_source="",
                          rdr_exact_wins=0, rdr_uniform_wins=0)

    def _tier_of_node(self, node) -> int:
        pages = node_pages(node, self.page_size)
        if self.tier_of is None or not pages.numel():
            return 0
        return int(self.tier_of(pages).to(torch.int64).clamp_min(0).max())

    def get_priority(self, node) -> float:
        """Distortion an eviction adds per freed token: ``utility · (1 - D[tier])`` (lowest evicted first)."""
        return self.utility(node) * (1.0 - self.distortion[self._tier_of_node(node)])

    def demotion_pages(self, nodes, tier, num_pages):
        from sphkv.retention import plan_nodes

        if tier + 1 >= len(self.page_bytes):
            return []
        cand = [(node, self._pages_at(node, tier)) for node in nodes]
        cand = [(node, p) for node, p in cand if p]
        if not cand:
            return []
        n = torch.tensor([len(p) for _, p in cand], dtype=torch.int64)             # pages of `tier` per node
        if int(n.sum()) <= num_pages:
            return cand
        pb, d, P = self.page_bytes, self.distortion, self.page_size
        # The binding budget is the full tier's arena: keeping node k there holds n_k·pb[t] of its bytes,
        # demoting it none (its pages move to tier t+1, whose arena the store frees first if needed).
        node_bytes = torch.stack([n * pb[tier], torch.zeros_like(n)], 1)            # [K, 2]: keep, demote
        tokens = (n * P).to(torch.float64)
        big = 1e6                                                                    # eviction is SGLang's, not ours
        dist = torch.stack([tokens * d[tier], tokens * d[tier + 1], tokens * big], 1)
        reuse = torch.tensor([self.utility(node) for node, _ in cand], dtype=torch.float64)
        budget = (int(n.sum()) - num_pages) * pb[tier]
        plan = plan_nodes(node_bytes, dist, reuse, budget)
        self.stats["rdr_plans"] += 1
        self.stats["rdr_last_objective"] = plan.objective
        self.stats["rdr_last_source"] = plan.source
        self.stats["rdr_exact_wins"] += int(plan.source == "exact")
        self.stats["rdr_uniform_wins"] += int(plan.source.startswith("uniform"))
        moved = (plan.tiers >= 1).nonzero().flatten().tolist()
        # the cheapest per page first, so the store's cut at num_pages keeps the plan's order
        moved.sort(key=lambda i: float(reuse[i]) * (d[tier + 1] - d[tier]))
        out = [cand[i] for i in moved]
        self.stats["rdr_pages_planned"] += sum(len(p) for _, p in out)
        return out


POLICIES: dict[str, type[NodePolicy]] = {"heuristic": ReusePolicy, "reuse": ReusePolicy, "rdr": RDRPolicy,
                                         "lru": LRUPolicy}


def make_policy(name: str, **kwargs) -> NodePolicy:
    """Build policy ``name`` of :data:`POLICIES`; an unknown name raises ``ValueError`` listing them."""
    if name not in POLICIES:
        raise ValueError(f"retention={name!r} is not a policy; allowed: {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)
