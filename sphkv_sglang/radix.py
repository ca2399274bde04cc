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
* locked nodes are never offered for demotion and never evicted;
* partial-page prefix reuse: SGLang's paged tree matches whole pages only; when the rest of a
  request's key shares ``m`` (``0 < m < page_size``) more tokens with the first page of a child of the
  matched node, :meth:`match_prefix` reports ``m`` more cached tokens (the tree-owned, protected part
  stays page-aligned) and :meth:`prefix_device_indices` — called when the request is allocated —
  copies those ``m`` tokens into a fresh page of the request's own (copy-on-write: the dense staging
  copy of the shared page, or its codes decoded), where the request's new tokens then continue. The
  shared page is never written; the copy is inserted into the tree with the request like any page.
"""
from __future__ import annotations

import logging
import time

import torch

from sglang.srt.mem_cache.base_prefix_cache import EvictParams
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
        self.partial_hits = 0           # requests that reused part of a cached page (copy-on-write)
        self.partial_tokens = 0
        self._partial: dict[str, tuple] = {}     # rid -> (child node, m, aligned len, offered at)

    # -- partial-page prefix reuse ----------------------------------------------------------------------
    PARTIAL_TTL_S = 120.0           # an offer not taken by an allocation within this time is dropped

    def match_prefix(self, params):
        """SGLang's page-aligned match, extended into the first page of the best child (see module doc)."""
        res = super().match_prefix(params)
        req = getattr(params, "req", None)
        if req is None or self.disable or self.is_eagle or self.page_size == 1:
            return res
        rid = getattr(req, "rid", None)
        self._partial.pop(rid, None)
        key, aligned, node = params.key, res.device_prefix_len, res.last_device_node
        if getattr(getattr(req, "kv", None), "holds_kv", False):   # its prefix comes from its own row
            return res
        if len(key) <= aligned or not node.children or not self._staging_room():
            return res
        best, m = None, 0
        for child in node.children.values():
            if child.value is None or len(child.value) < self.page_size:
                continue
            try:
                n = child.key.match_at(key, offset=aligned)
            except ValueError:                          # another extra_key / cache_salt namespace
                continue
            n = min(n, self.page_size - 1, len(key) - aligned)
            if n > m:
                best, m = child, n
        if best is None:
            return res
        self._partial[rid] = (best, m, aligned, time.monotonic())
        return res._replace(device_prefix_len=aligned + m, cache_protected_len=aligned)

    def _staging_room(self) -> bool:
        """Whether a copy can take a staging slot now (two slots kept for the running requests)."""
        now = time.monotonic()
        for rid in [r for r, v in self._partial.items() if now - v[3] > self.PARTIAL_TTL_S]:
            del self._partial[rid]
        return len(self.store.table.free_stage) - len(self._partial) > 2

    def prefix_device_indices(self, req):
        """The matched prefix's slots; a partial match gets its copied page (allocated and filled here)."""
        offer = self._partial.pop(getattr(req, "rid", None), None)
        path = self.path_device_indices(req.last_node)
        if offer is None or req.prefix_len <= len(path):
            assert len(path) >= req.prefix_len, (req.rid, len(path), req.prefix_len)
            return path[: req.prefix_len]
        child, m, aligned, _ = offer
        if aligned != len(path) or req.prefix_len != aligned + m:
            raise RuntimeError(f"sphkv partial-page match of request {req.rid} went stale: prefix_len "
                               f"{req.prefix_len}, matched page-aligned {aligned} + {m}, path {len(path)}")
        if child.value is None or child.parent is not req.last_node:
            raise RuntimeError(f"sphkv partial-page match of request {req.rid}: the source page was evicted "
                               "between match and allocation")
        P = self.page_size
        alloc = self.token_to_kv_pool_allocator
        slots = alloc.alloc(P)
        if slots is None:                               # make room without losing the source page
            self.inc_lock_ref(child)
            try:
                self.evict(EvictParams(num_tokens=P))
            finally:
                self.dec_lock_ref(child)
            slots = alloc.alloc(P)
            if slots is None:
                raise RuntimeError(f"sphkv partial-page match of request {req.rid}: no free page for the copy")
        self.store.copy_page_prefix(int(child.value[0]) // P, int(slots[0]) // P, m)
        self.partial_hits += 1
        self.partial_tokens += m
        return torch.cat([path.to(slots.device, torch.int64), slots[:m].to(torch.int64)])

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
                    evicted_tokens=self.evicted_tokens, partial_page_hits=self.partial_hits,
                    partial_page_tokens=self.partial_tokens, retention=self.eviction_strategy.name,
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
