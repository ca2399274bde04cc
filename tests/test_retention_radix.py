# SPDX-License-Identifier: Apache-2.0
"""Node retention in the sphkv radix cache without a server: the ``rdr`` policy (rate-distortion plan
over unlocked radix nodes) against the ``heuristic`` one, on SGLang's pool / allocator / radix classes."""
from __future__ import annotations

import itertools
import time
from array import array
from types import SimpleNamespace

import pytest
import torch

from sphkv_sglang.config import SphKVServeConfig
from test_sglang_units import P, _insert   # the same page size and insert helper as the radix unit tests


def _stack(retention):
    pytest.importorskip("sglang")
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    from sphkv_sglang.allocator import SphKVPagedAllocator
    from sphkv_sglang.pool import SphKVPool
    from sphkv_sglang.radix import SphKVRadixCache

    cfg = SphKVServeConfig(page_size=P, max_running_requests=2, tier_fractions=(0.5, 0.5), retention=retention)
    pool = SphKVPool(16 * P, P, torch.bfloat16, 2, 64, 2, "cpu", False, sphkv_config=cfg)
    alloc = SphKVPagedAllocator(16 * P, P, torch.bfloat16, "cpu", pool, False)
    cache = SphKVRadixCache(CacheInitParams(disable=False, req_to_token_pool=None,
                                            token_to_kv_pool_allocator=alloc, page_size=P))
    return SimpleNamespace(pool=pool, alloc=alloc, cache=cache, store=pool.store)


def test_registry_selects_policy_and_rejects_unknown():
    from sphkv_sglang.config import RETENTION_POLICIES_HINT
    from sphkv_sglang.retention import POLICIES, LRUPolicy, RDRPolicy, ReusePolicy, make_policy

    assert sorted(POLICIES) == sorted(RETENTION_POLICIES_HINT)
    assert POLICIES["heuristic"] is ReusePolicy and POLICIES["rdr"] is RDRPolicy and POLICIES["lru"] is LRUPolicy
    with pytest.raises(ValueError, match=r"retention='mru' is not a policy; allowed: \['heuristic', 'lru'"):
        make_policy("mru", page_size=P)
    with pytest.raises(ValueError, match="retention='mru'"):
        SphKVServeConfig.from_json('{"retention": "mru"}')
    assert SphKVServeConfig.from_json('{"retention": "rdr"}').retention == "rdr"
    assert SphKVServeConfig().retention == "heuristic"
    with pytest.raises(ValueError, match=r"page_bytes=\[10, 20\] must be positive and nonincreasing"):
        RDRPolicy(page_size=P, page_bytes=(10, 20), distortion=(0.1, 0.2))
    with pytest.raises(ValueError, match=r"distortion=\[0.3, 0.2\] must be in \[0, 1\] and nondecreasing"):
        RDRPolicy(page_size=P, page_bytes=(20, 10), distortion=(0.3, 0.2))


def test_tier_distortion_orders_tiers():
    from sphkv_sglang.retention import tier_distortion

    d = tier_distortion(("sphkv-8", "sphkv-4", "sphkv-2"), head_dim=64, page_size=P, num_tokens=4 * P)
    assert 0.0 < d[0] < d[1] < d[2] <= 1.0
    assert d[0] < 0.1 * d[2]                       # 8 bits vs 2 bits: an order of magnitude apart
    with pytest.raises(ValueError, match="num_tokens=12 must be a positive multiple of page_size=8"):
        tier_distortion(("sphkv-4",), head_dim=64, page_size=P, num_tokens=12)


class _Node:
    def __init__(self, first_page, pages, hits, children=0, age=0.0):
        self.value = torch.arange(first_page * P, (first_page + pages) * P)
        self.hit_count, self.children = hits, {i: None for i in range(children)}
        self.last_access_time = time.monotonic() - age


def test_rdr_demotion_is_the_brute_force_optimum():
    """On random node sets the pages RDR demotes free at least the pages asked for, and their expected
    distortion (utility × pages × ΔD) is the minimum over every subset of nodes that frees as many."""
    from sphkv_sglang.retention import RDRPolicy

    g = torch.Generator().manual_seed(0)
    pb, dist = (96, 40), (0.02, 0.3)
    for trial in range(12):
        k = 3 + trial % 4
        sizes = torch.randint(1, 6, (k,), generator=g).tolist()
        first = [1 + sum(sizes[:i]) for i in range(k)]
        nodes = [_Node(f, s, int(torch.randint(0, 6, (1,), generator=g)), age=float(torch.rand(1, generator=g)) * 90)
                 for f, s in zip(first, sizes)]
        pol = RDRPolicy(page_size=P, page_bytes=pb, distortion=dist,
                        tier_of=lambda p: torch.zeros(len(p), dtype=torch.int8))
        need = int(torch.randint(1, sum(sizes), (1,), generator=g))
        chosen = pol.demotion_pages(nodes, 0, need)
        util = {id(n): pol.utility(n) for n in nodes}
        got_pages = sum(len(p) for _, p in chosen)
        assert got_pages >= need
        cost = lambda sel: sum(util[id(n)] * len(n.value) * (dist[1] - dist[0]) for n in sel)   # noqa: E731
        best = min(cost(sel) for r in range(1, k + 1) for sel in itertools.combinations(nodes, r)
                   if sum(len(n.value) // P for n in sel) >= need)
        assert cost([n for n, _ in chosen]) <= best * (1 + 1e-9) + 1e-12, (trial, sizes, need)
        assert pol.stats["rdr_plans"] == 1


def test_rdr_keeps_hot_node_that_heuristic_cut_demotes():
    """A big cold node and a small hot one; 2 pages needed. The heuristic takes pages of the coldest node
    first (page-granular); RDR never demotes the hot node and never names fewer pages than needed."""
    from sphkv_sglang.retention import RDRPolicy, ReusePolicy

    hot, cold = _Node(1, 2, hits=9), _Node(3, 5, hits=0, age=120.0)
    zeros = lambda p: torch.zeros(len(p), dtype=torch.int8)                      # noqa: E731
    rdr = RDRPolicy(page_size=P, page_bytes=(96, 40), distortion=(0.02, 0.3), tier_of=zeros)
    heur = ReusePolicy(page_size=P, tier_of=zeros)
    for pol in (rdr, heur):
        out = pol.demotion_pages([hot, cold], 0, 2)
        assert [n for n, _ in out] == [cold]
    # Eviction: an already demoted node loses less when dropped, so it is evicted first.
    same = _Node(9, 2, hits=1)
    demoted = _Node(11, 2, hits=1)
    rdr2 = RDRPolicy(page_size=P, page_bytes=(96, 40), distortion=(0.02, 0.3),
                     tier_of=lambda p: (p >= 11).to(torch.int8))
    assert rdr2.get_priority(demoted) < rdr2.get_priority(same)


@pytest.mark.parametrize("retention", ["heuristic", "rdr"])
def test_pool_under_pressure_locked_untouched_metrics_exported(retention):
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from sphkv_sglang.retention import node_pages

    s = _stack(retention)
    free0 = s.alloc.available_size()
    locked, _ = _insert(s, list(range(1000, 1000 + 2 * P)), seed=1)
    s.cache.inc_lock_ref(locked)
    lp = node_pages(locked, P)
    before = s.store._view(0, 1, "k_codes")[s.store.table.phys_of[lp].long()].clone()
    hot, _ = _insert(s, list(range(5000, 5000 + 2 * P)), seed=2)
    for _ in range(6):                                          # the hot prefix is matched by many requests
        s.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", list(range(5000, 5000 + 2 * P))))))
    hot.hit_count = max(hot.hit_count, 6)
    hp = node_pages(hot, P)
    seq = 0
    while s.alloc.available_size() >= 2 * P:
        _insert(s, list(range(2000 + 100 * seq, 2000 + 100 * seq + 2 * P)), seed=10 + seq)
        seq += 1
    s.store.table.check()
    st = s.cache.retention_stats()
    assert s.store.counters["pages_demoted"] > 0 and st["demoted_nodes"] > 0
    assert st["retention"] == retention
    assert (s.store.table.tier_of[lp] == 0).all()
    assert torch.equal(s.store._view(0, 1, "k_codes")[s.store.table.phys_of[lp].long()], before)
    assert (s.store.table.tier_of[hp] == 0).all(), "the most reused unlocked node was demoted"
    coded = s.store.table.counts()["coded"]
    assert st["bytes_per_tier"] == [c * b for c, b in zip(coded, s.cache.page_bytes)] and coded[1] > 0
    assert s.cache.page_bytes[0] > s.cache.page_bytes[1] > 0
    if retention == "rdr":
        assert st["rdr_plans"] > 0 and st["rdr_pages_planned"] >= s.store.counters["pages_demoted"]
    s.cache.dec_lock_ref(locked)
    s.cache.evict(EvictParams(num_tokens=10 ** 6))
    assert s.alloc.available_size() == free0
    s.store.table.check()
    assert s.store.table.counts()["coded"] == [0, 0]
