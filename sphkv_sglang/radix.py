# SPDX-License-Identifier: Apache-2.0
"""Radix cache with node-granular retention over the sphkv pool (``--radix-cache-backend sphkv``).

A subclass of SGLang's Python :class:`RadixCache` (tree nodes own page-aligned slot spans; running
requests lock the nodes on their path):

* a node's span is compressed when it is finalized — tree nodes hold only full pages, and the pool
  codes a page the moment it is full, so every node is coded by the time it is inserted; every
  request that matches a node reads the same coded pages;
* under memory pressure (the most precise tier is full when a new page must be coded) the pool asks
  :meth:`SphKVRadixCache.demotion_candidates` for the coldest pages of unlocked nodes and re-encodes
  them one tier down — demotion happens before any eviction, because SGLang evicts only when logical
  pages run out and the tiers together hold every logical page;
* eviction (SGLang's loop over evictable leaves) orders by the same node utility
  (:mod:`~sphkv_sglang.retention`); evicted spans go back to the allocator, which frees their pages in
  the pool — nothing leaks;
* locked nodes are never offered for demotion and never evicted.
"""
from __future__ import annotations

import logging

import torch

from sglang.srt.mem_cache.radix_cache import RadixCache

from .retention import make_policy, node_pages, tier_distortion

__all__ = ["SphKVRadixCache", "create_sphkv_radix_cache"]

logger = logging.getLogger(__name__)


class SphKVRadixCache(RadixCache):
    """RadixCache whose eviction and demotion order follow the sphkv node utility.

    Parameters
    ----------
    params : SGLang ``CacheInitParams``; its allocator's kvcache must be a ``SphKVPool``.

    Examples
    --------
    >>> cache = SphKVRadixCache(params)     # doctest: +SKIP  (built by create_sphkv_radix_cache)
    """

    def __init__(self, params):
        super().__init__(params)
        pool = self.token_to_kv_pool_allocator.get_kvcache()
        self.store = pool.store
        cfg, dims = pool.sphkv_config, dict(num_layers=pool.layer_num, num_kv_heads=pool.head_num,
                                            head_dim=pool.head_dim)
        self.page_bytes = tuple(cfg.page_bytes(t, **dims) for t in cfg.tiers)
        extra = {}
        if cfg.retention == "rdr":
            extra = dict(page_bytes=self.page_bytes,
                         distortion=tier_distortion(cfg.tiers, head_dim=pool.head_dim, page_size=self.page_size))
        self.eviction_strategy = make_policy(cfg.retention, page_size=self.page_size,
                                             mass_of=lambda pages: self.store.page_mass[pages],
                                             tier_of=lambda pages: self.store.table.tier_of[pages], **extra)
        self.store.demotion_source = self.demotion_candidates
        self.demoted_nodes = 0
        self.evicted_tokens = 0

    def evict(self, params):
        """SGLang's eviction, counted (``evicted_tokens`` in ``/get_server_info``; ``reset`` is not counted)."""
        result = super().evict(params)
        self.evicted_tokens += int(getattr(result, "num_tokens_evicted", 0) or 0)
        return result

    def demotion_candidates(self, tier: int, num_pages: int) -> list[int]:
        """Up to ``num_pages`` logical pages of ``tier`` from unlocked nodes, as the retention policy
        chooses (``heuristic``: lowest utility first; ``rdr``: :func:`sphkv.retention.plan_nodes`)."""
        nodes = []
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.lock_ref == 0 and not node.evicted:
                nodes.append(node)
        out: list[int] = []
        for _, pages in self.eviction_strategy.demotion_pages(nodes, tier, num_pages):
            self.demoted_nodes += 1
            out.extend(pages)
            if len(out) >= num_pages:
                break
        return out[:num_pages]

    def retention_stats(self) -> dict:
        """Tree sizes, demotion/eviction counts, coded bytes held per tier and the policy's counters."""
        coded = self.store.table.counts()["coded"]
        return dict(evictable_tokens=self.evictable_size(), protected_tokens=self.protected_size(),
                    tree_tokens=self.total_size(), demoted_nodes=self.demoted_nodes,
                    evicted_tokens=self.evicted_tokens, retention=self.eviction_strategy.name,
                    bytes_per_tier=[int(c) * b for c, b in zip(coded, self.page_bytes)],
                    **self.eviction_strategy.stats)


def create_sphkv_radix_cache(ctx) -> SphKVRadixCache:
    """Factory for SGLang's radix-cache registry (``--radix-cache-backend sphkv``)."""
    from .pool import SphKVPool

    pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    if not isinstance(pool, SphKVPool):
        raise TypeError(f"--radix-cache-backend sphkv needs the sphkv KV pool (launch with --sphkv); "
                        f"got {type(pool).__name__}")
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.enable_hierarchical_cache:
        raise NotImplementedError("sphkv radix cache: hybrid SWA/SSM models and HiCache are not supported")
    cache = SphKVRadixCache(ctx.params)
    logger.info("sphkv radix cache: node retention policy %r, demotion over tiers %s",
                pool.sphkv_config.retention, list(pool.sphkv_config.tiers))
    return cache
