# SPDX-License-Identifier: Apache-2.0
"""Tier-homogeneous paged store: round trips, exact bytes, free lists without leaks, poisoning."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sphkv.gridquant import grid_tierset
from sphkv.pages import TIER_KINDS, OutOfPagesError, PagedStore, PageError, make_arena, tier_kind
from sphkv import SphKVConfig
from sphkv.tiers import PAGE_META_BYTES, Tier, TierSet

D = 64


def _kv(n, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


@pytest.mark.parametrize("tierset", [TierSet.default(), grid_tierset()], ids=["ada", "grid"])
def test_arena_bytes_match_tier_page_bytes(tierset):
    for tier, pb in zip(tierset.tiers, tierset.page_bytes()):
        arena = make_arena(tier, 3, head_dim=D, page_size=64)
        assert arena.nbytes() == 3 * (pb - PAGE_META_BYTES), tier.name


@pytest.mark.parametrize("tierset", [TierSet.default(page_size=16), grid_tierset(page_size=16)], ids=["ada", "grid"])
def test_write_gather_roundtrip_and_positions(tierset):
    store = PagedStore(tierset, 8, num_layers=2, num_kv_heads=2)
    k, v = _kv(37)
    pos = torch.randperm(100)[:37]
    pages = store.write(1, 0, 1, k, v, pos)
    assert [m.count for m in pages] == [16, 16, 5]
    assert all(m.positions.dtype == torch.int32 for m in pages)
    got_pos, gk, gv, tier = store.gather(1, 0)
    order = pos.argsort()
    assert torch.equal(got_pos, pos[order]) and bool((tier == 1).all())
    assert float((gk - k[order]).norm() / k.norm()) < 0.25
    assert float((gv - v[order]).norm() / v.norm()) < 0.25
    store.write(1, 0, 0, k[:3], v[:3], torch.tensor([200, 201, 202]))              # dense: bf16 exact
    _, gk, _, tier = store.gather(1, 0)
    assert torch.equal(gk[tier == 0], k[:3].to(torch.bfloat16).float())
    assert store.gather(0, 1)[0].numel() == 0


def test_byte_accounting_and_metadata_overhead():
    ts = TierSet.default()
    store = PagedStore(ts, 20, num_layers=1, num_kv_heads=3)
    k, v = _kv(64 * 6 + 10)
    for t in range(3):
        store.write(0, t, t, k, v, torch.arange(k.shape[0]))                       # 6 full pages + 1 partial
    b = store.bytes()
    pb = ts.page_bytes()
    assert b.pages == (7, 7, 7) and b.tokens == (394, 394, 394)
    assert b.stored_bytes == 7 * sum(pb) and b.metadata_bytes == 21 * PAGE_META_BYTES
    assert b.arena_bytes == 7 * sum(x - PAGE_META_BYTES for x in pb)
    assert b.position_bytes == 4 * 3 * 394
    assert int(store.bytes_per_head().sum()) == b.stored_bytes
    # metadata overhead at default settings (page_size 64), worst tier is the smallest page
    for tier_pb in pb:
        assert PAGE_META_BYTES / tier_pb <= 0.02
    assert b.metadata_overhead <= 0.02
    assert set(b.as_dict()) >= {"stored_bytes", "metadata_overhead", "position_index_overhead"}


def test_out_of_pages_is_all_or_nothing():
    store = PagedStore(TierSet.default(page_size=16), [2, 1, 1], num_layers=1, num_kv_heads=1)
    k, v = _kv(40)
    with pytest.raises(OutOfPagesError, match="needs 3 pages"):
        store.write(0, 0, 0, k, v, torch.arange(40))
    assert store.free_pages(0) == 2 and store.pages(0, 0) == ()
    store.check()
    with pytest.raises(ValueError, match="distinct"):
        store.write(0, 0, 0, k[:2], v[:2], torch.tensor([3, 3]))


def test_freed_pages_are_poisoned_and_stale_reads_caught():
    ts = TierSet.default(page_size=16)
    store = PagedStore(ts, 4, num_layers=1, num_kv_heads=1, debug=True)
    k, v = _kv(20)
    dense = store.write(0, 0, 0, k[:10], v[:10], torch.arange(10))[0]
    coded = store.write(0, 0, 1, k[10:], v[10:], torch.arange(10, 20))[0]
    store.free(0, 0, dense)
    store.free(0, 0, coded)
    with pytest.raises(PageError, match="not a live page"):
        store.decode(0, 0, dense)
    with pytest.raises(PageError):
        store.free(0, 0, coded)                                                  # double free
    for t, meta in ((0, dense), (1, coded)):                                     # raw reads see poison
        kind = TIER_KINDS[tier_kind(ts.tiers[t])]
        rk, rv = kind.decode(store.arenas[t], torch.tensor([meta.page]), torch.tensor([meta.count]))
        assert bool(torch.isnan(rk).all()) and bool(torch.isnan(rv).all())
    assert bool((store.arenas[1].k_codes[coded.page] == 0xFF).all())
    # a page reused after poisoning is fully rewritten
    again = store.write(0, 0, 1, k[:16], v[:16], torch.arange(16))[0]
    assert again.page == coded.page and not bool(torch.isnan(store.decode(0, 0, again)[0]).any())
    store.check()


def test_demote_moves_a_page_down_and_keeps_positions():
    store = PagedStore(TierSet.default(page_size=16), 4, num_layers=1, num_kv_heads=1)
    k, v = _kv(16)
    meta = store.write(0, 0, 0, k, v, torch.arange(100, 116))[0]
    (lower,) = store.demote(0, 0, meta, 2)
    assert lower.tier == 2 and torch.equal(lower.positions, meta.positions)
    assert store.free_pages(0) == 4 and store.free_pages(2) == 3
    _, gk, _, _ = store.gather(0, 0)
    assert 0.02 < float((gk - k).norm() / k.norm()) < 0.6
    with pytest.raises(ValueError, match="lower tier"):
        store.demote(0, 0, lower, 1)
    store.check()


def test_compaction_merges_partial_pages_of_a_tier():
    store = PagedStore(TierSet.default(page_size=16), 8, num_layers=1, num_kv_heads=2)
    k, v = _kv(30)
    for lo, hi in ((0, 10), (10, 20), (20, 30)):
        store.write(0, 1, 0, k[lo:hi], v[lo:hi], torch.arange(lo, hi) * 2)        # three partial dense pages
    store.write(0, 1, 1, k[:5], v[:5], torch.arange(100, 105))                     # one partial coded page
    before = store.bytes().stored_bytes
    assert store.compact() == 1                                                    # 3 dense partials → 2 pages
    pos, gk, _, tier = store.gather(0, 1)
    assert sorted(m.count for m in store.pages(0, 1) if m.tier == 0) == [14, 16]
    assert torch.equal(pos[tier == 0], torch.arange(30) * 2)
    assert torch.equal(gk[tier == 0], k.to(torch.bfloat16).float())               # dense moves losslessly
    assert store.bytes().stored_bytes == before - TierSet.default(page_size=16).page_bytes()[0]
    store.check()


_OPS = st.lists(st.tuples(st.sampled_from(["write", "demote", "compact", "free", "flush"]),
                          st.integers(0, 1), st.integers(0, 1), st.integers(0, 2), st.integers(1, 11)),
                min_size=1, max_size=30)


@settings(max_examples=80, deadline=None)
@given(ops=_OPS)
def test_no_page_leaks_property(ops):
    mk = lambda n: Tier(n, SphKVConfig.from_name(n, head_dim=16, page_size=4, value_group=16))  # noqa: E731
    ts = TierSet((Tier("dense"), mk("sphkv-4"), mk("sphkv-2")), head_dim=16, page_size=4)
    store = PagedStore(ts, [6, 5, 4], num_layers=2, num_kv_heads=2, debug=True)
    start = [store.free_pages(t) for t in range(3)]
    model: dict[tuple[int, int], set[int]] = {}                                    # (layer, head) → positions
    next_pos = 0
    for op, layer, head, tier, n in ops:
        live = store.pages(layer, head)
        if op == "write":
            k, v = torch.randn(n, 16), torch.randn(n, 16)
            pos = torch.arange(next_pos, next_pos + n)
            try:
                store.write(layer, head, tier, k, v, pos)
            except OutOfPagesError:
                continue
            next_pos += n
            model.setdefault((layer, head), set()).update(pos.tolist())
        elif op == "demote" and live:
            meta = live[n % len(live)]
            if meta.tier < 2:
                try:
                    store.demote(layer, head, meta, meta.tier + 1)
                except OutOfPagesError:
                    pass
        elif op == "compact":
            store.compact(layer)
        elif op == "free" and live:
            meta = live[n % len(live)]
            store.free(layer, head, meta)
            model[(layer, head)] -= set(meta.positions.tolist())
        elif op == "flush":
            store.flush(layer)
            for h in range(2):
                model.pop((layer, h), None)
        store.check()
        for (l, h), positions in model.items():
            assert set(store.gather(l, h)[0].tolist()) == positions
    store.flush()
    store.check()
    assert [store.free_pages(t) for t in range(3)] == start


def test_shrink_store_demotes_cold_pages_first_and_keeps_protected():
    from sphkv.retention import shrink_store

    base = TierSet.default(page_size=16)
    ts = TierSet(base.tiers, page_size=16, distortion=(0.0, 0.2, 0.6))
    store = PagedStore(ts, 12, num_layers=1, num_kv_heads=2)
    k, v = _kv(64)
    for h in range(2):
        store.write(0, h, 0, k, v, torch.arange(64))                      # 4 dense pages per head
    utility = torch.full((1, 2, 64), 1e-3)
    utility[0, 0] = 1.0                                                   # head 0 is hot, head 1 cold
    protected = torch.zeros(64, dtype=torch.bool)
    protected[:2] = True                                                  # the page holding the sinks stays
    before = store.bytes().stored_bytes
    rep = shrink_store(store, utility, before - 2 * ts.page_bytes()[0], protected=protected)
    assert rep.bytes_after <= before - 2 * ts.page_bytes()[0] and rep.bytes_after == store.bytes().stored_bytes
    hot = store.pages(0, 0)
    assert all(m.tier == 0 for m in hot) and len(hot) == 4                # the hot head is untouched
    cold = store.pages(0, 1)
    assert any(m.tier > 0 for m in cold) or len(cold) < 4
    assert [m.tier for m in cold if int(m.positions[0]) == 0] == [0]     # protected page kept dense
    store.check()
    with pytest.raises(ValueError, match="protected"):
        shrink_store(store, utility, 10, protected=protected)
