# SPDX-License-Identifier: Apache-2.0
"""Radix-node utility for retention decisions (demotion order, eviction order).

RDR at radix-node granularity: a node's span is one retention unit. Its utility estimates how much
future attention its tokens will receive, weighted by *expected reuse*:

``reuse``   ``(1 + hit_count) · (1 + children) · 0.5^(age / half_life) · (1 + mass / tokens)`` —
            hit count and branching measure how many requests share the span, recency how likely
            the conversation comes back, ``mass`` is the attention probability the span's pages
            received so far (accumulated by the backend, summed over layers, heads and queries).
``lru``     last access time (SGLang's default order), for comparison.

Lower utility is demoted first and evicted first. Locked nodes (``lock_ref > 0``: a running
request reads them) are never candidates — the radix cache filters them before asking.
Policies form a registry; each is an SGLang ``EvictionStrategy`` so the stock eviction loop uses it.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from sglang.srt.mem_cache.evict_policy import EvictionStrategy

__all__ = ["POLICIES", "ReusePolicy", "LRUPolicy", "make_policy", "node_pages"]


def node_pages(node, page_size: int) -> torch.Tensor:
    """Logical pages ``[k]`` int64 of a radix node's span (its value holds page-aligned slot ids)."""
    value = node.value
    if value is None or len(value) == 0:
        return torch.empty(0, dtype=torch.int64)
    return value[::page_size].to("cpu", torch.int64) // page_size


class ReusePolicy(EvictionStrategy):
    """Utility = expected reuse × attention mass; see the module docstring.

    Examples
    --------
    >>> class N: hit_count, children, last_access_time, value = 3, {}, time.monotonic(), torch.arange(64)
    >>> ReusePolicy(page_size=64, mass_of=lambda p: torch.zeros(len(p))).get_priority(N()) > 3.9
    True
    """

    def __init__(self, *, page_size: int, mass_of: Callable[[torch.Tensor], torch.Tensor], half_life_s: float = 60.0):
        self.page_size, self.mass_of, self.half_life_s = page_size, mass_of, half_life_s

    def get_priority(self, node) -> float:
        age = max(0.0, time.monotonic() - node.last_access_time)
        reuse = (1 + node.hit_count) * (1 + len(node.children)) * 0.5 ** (age / self.half_life_s)
        pages = node_pages(node, self.page_size)
        tokens = max(1, pages.numel() * self.page_size)
        mass = float(self.mass_of(pages).sum()) if pages.numel() else 0.0
        return reuse * (1.0 + mass / tokens)


class LRUPolicy(EvictionStrategy):
    """Least recently used first (SGLang's default order)."""

    def __init__(self, **_):
        pass

    def get_priority(self, node) -> float:
        return node.last_access_time


POLICIES: dict[str, type[EvictionStrategy]] = {"reuse": ReusePolicy, "lru": LRUPolicy}


def make_policy(name: str, **kwargs) -> EvictionStrategy:
    if name not in POLICIES:
        raise ValueError(f"retention={name!r} is not a policy; allowed: {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)
