# SPDX-License-Identifier: Apache-2.0
"""Reliability without a server (issue 7): bad configuration, NaN/Inf writes, pool invariants under
random operation sequences with freed pages poisoned, locked and shared radix nodes.

Complements ``test_sglang_units.py`` (the option checks and single scenarios) and
``test_rdr_store.py`` (the core ``PagedStore``, including compaction, which the SGLang-side store
does not need: its pages are whole logical pages).
"""
from __future__ import annotations

import argparse
import json
from array import array
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sphkv.config import SUPPORTED_HEAD_DIMS, SphKVConfig
from sphkv.validation import NonFiniteError
from sphkv_sglang.cli import SphKVArgumentError, add_sphkv_args, check_model, minimum_budget, resolve_args
from sphkv_sglang.config import SphKVServeConfig
from sphkv_sglang.debug import PoisonedReadError, enable_poison
from sphkv_sglang.page_table import PageTableError
from sphkv_sglang.store import SphKVStore

P = 8


# -- 1. invalid configuration: the option and the allowed values ----------------------------------------
def _fake_model(tmp_path, head_dim=64, heads=9, kv_heads=3, layers=30):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        hidden_size=heads * head_dim, head_dim=head_dim)))
    return str(tmp_path)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(level_bits=(9, 4, 4, 4, 4, 4)), "level_bits[0]=9 is out of range; allowed: 1..8"),
    (dict(level_bits=(4, 0, 4, 4, 4, 4)), "level_bits[1]=0 is out of range; allowed: 1..8"),
    (dict(level_bits=(4, 4, 4)), "must be a tuple of 6 ints"),
    (dict(head_dim=48), f"head_dim=48 is not supported; allowed: {SUPPORTED_HEAD_DIMS}"),
    (dict(page_size=12), "page_size=12 must be a power of two"),
])
def test_codec_config_errors_name_option_and_allowed(kwargs, needle):
    with pytest.raises(ValueError) as e:
        SphKVConfig(**kwargs)
    assert needle in str(e.value)


def test_model_checks_in_launcher_name_head_dim_and_budget(tmp_path):
    bad = _fake_model(tmp_path, head_dim=48)
    with pytest.raises(SphKVArgumentError) as e:
        check_model(SphKVServeConfig(), bad)
    assert "head_dim=48 is not supported; allowed:" in str(e.value)
    path = tmp_path / "ok"
    path.mkdir()
    ok = _fake_model(path)
    cfg = SphKVServeConfig(budget_bytes=1 << 20)
    need = minimum_budget(cfg, dict(num_layers=30, num_kv_heads=3, head_dim=64))
    with pytest.raises(SphKVArgumentError) as e:
        check_model(cfg, ok)
    assert "--sphkv-budget 1048576 B is below the minimum" in str(e.value) and f"allowed: >= {need} B" in str(e.value)
    check_model(SphKVServeConfig(budget_bytes=need), ok)            # exactly the minimum is accepted


def _parser():
    parser = argparse.ArgumentParser(exit_on_error=False)
    for name in ("--attention-backend", "--radix-cache-backend", "--model-path"):
        parser.add_argument(name, default=None)
    parser.add_argument("--page-size", type=int, default=1)
    parser.add_argument("--max-running-requests", type=int, default=None)
    add_sphkv_args(parser)
    return parser


@pytest.mark.parametrize("argv, needles", [
    (["--sphkv-config", '{"preset": "sphkv-4", "page_size": 64,}'],
     ["not valid JSON", "'{\"preset\": \"sphkv-4\", \"page_size\": 64,}'", "near"]),
    (["--sphkv-config", "preset=sphkv-8"], ["not valid JSON", "'preset=sphkv-8'"]),
    (["--sphkv-config", '["sphkv-8"]'], ["must be a JSON object"]),
    (["--sphkv-config", '{"page_size": 48}'], ["page_size=48 is not supported; allowed: (8, 16, 32, 64, 128, 256)"]),
    (["--sphkv-config", '{"nonfinite": "ignore"}'], ["nonfinite='ignore'", "allowed: ('raise', 'zero')"]),
    (["--sphkv-config", '{"budget_bytes": 0}'], ["budget_bytes"]),
    (["--sphkv-budget=-1GiB"], ["--sphkv-budget", "budget must be > 0"]),
    (["--sphkv-budget", "0"], ["--sphkv-budget", "must be a positive byte size"]),
    (["--sphkv-preset", "sphkv-7"], ["--sphkv-preset", "invalid choice", "sphkv-4"]),
])
def test_cli_errors_quote_text_and_name_option(argv, needles):
    with pytest.raises(argparse.ArgumentError) as e:
        _parser().parse_args(["--sphkv", *argv])
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_nothing_is_rewritten_when_validation_fails():
    """A failing --sphkv resolve leaves SGLang's arguments as given (no half-configured server)."""
    args = _parser().parse_args(["--sphkv", "--page-size", "12", "--attention-backend", "torch_native"])
    before = dict(vars(args))
    with pytest.raises(SphKVArgumentError):
        resolve_args(args)
    assert vars(args) == before


# -- 1. NaN / Inf written to the pool -------------------------------------------------------------------
def _store(nonfinite="zero", pages=12, layers=2, **kw):
    cfg = SphKVServeConfig(page_size=P, max_running_requests=2, nonfinite=nonfinite, **kw)
    return SphKVStore(cfg, num_pages=pages, num_layers=layers, num_kv_heads=2, head_dim=64, dtype=torch.float32)


def _kv(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 64, generator=g) * 2 + 0.5, torch.randn(n, 2, 64, generator=g)


def _coded(st_, pages):
    phys = st_.table.phys_of[pages].long()
    return {name: st_._view(0, layer, name)[phys].clone() for layer in range(st_.num_layers)
            for name in ("k_codes", "k_radius", "k_mean", "v_codes", "v_scale")}


def _read(st_, slots):
    """The batch plan of one request reading ``slots`` (what the backend hands to attention)."""
    slots = slots.to(torch.int64)
    return st_.plan_pages(slots[None], torch.tensor([slots.numel()]))


def test_serving_default_sanitizes_nonfinite():
    """What ``--sphkv`` alone gives (no nonfinite key anywhere) zeroes and counts a NaN row instead of
    raising: built through the launcher's own resolve path, then written to."""
    cfg = resolve_args(_parser().parse_args(["--sphkv", "--page-size", str(P), "--max-running-requests", "2"]))
    st_ = SphKVStore(cfg, num_pages=12, num_layers=1, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    k, v = _kv(P)
    k[3, 1, 5] = float("nan")
    st_.write(0, torch.arange(P, 2 * P), k, v)                 # must not raise
    assert st_.counters["nonfinite_rows"] == 1
    assert bool(torch.isfinite(_coded(st_, torch.tensor([1]))["k_radius"].float()).all())


def test_nonfinite_rows_are_zeroed_counted_and_other_pages_untouched():
    clean, dirty = _store(), _store()
    k, v = _kv(3 * P)
    kd, vd = k.clone(), v.clone()
    kd[2 * P + 1, 0, 3] = float("nan")                  # page 3 (another request's page) gets a NaN key
    vd[2 * P + 5, 1, :] = float("inf")                  # ... and an Inf value row
    loc = torch.arange(P, 4 * P)
    for layer in range(2):
        clean.write(layer, loc, k, v)
        dirty.write(layer, loc, kd, vd)
    assert dirty.counters["nonfinite_rows"] == 2 * 2 and clean.counters["nonfinite_rows"] == 0
    a, b = _coded(clean, torch.tensor([1, 2])), _coded(dirty, torch.tensor([1, 2]))
    assert all(torch.equal(a[n], b[n]) for n in a)       # pages 1, 2 bit-identical
    coded = _coded(dirty, torch.tensor([1, 2, 3]))
    assert all(bool(torch.isfinite(coded[n].float()).all()) for n in ("k_radius", "k_mean", "v_scale"))


def test_nonfinite_raise_names_layer_and_corrupts_nothing_else():
    st_ = _store("raise")
    k, v = _kv(2 * P)
    for layer in range(2):                               # request A: pages 1, 2 coded
        st_.write(layer, torch.arange(P, 3 * P), k, v)
    before = _coded(st_, torch.tensor([1, 2]))
    kb, vb = _kv(P + 3, seed=1)
    bad = vb.clone()
    bad[4, 0, 0] = float("nan")
    loc_b = torch.arange(3 * P, 4 * P + 3)               # request B: page 3 full, page 4 partial
    st_.write(0, loc_b, kb, vb)
    with pytest.raises(NonFiniteError, match="values of layer 1"):
        st_.write(1, loc_b, kb, bad)                      # layer 1 of the same forward produces a NaN
    after = _coded(st_, torch.tensor([1, 2]))
    assert all(torch.equal(before[n], after[n]) for n in before)
    st_.release(torch.tensor([3, 4]))                     # SGLang frees B's pages: nothing leaks
    st_.release(torch.tensor([1, 2]))
    st_.table.check()
    assert st_.table.counts()["coded"] == [0, 0] and st_.table.counts()["staging"] == 0


# -- 2. poisoning: a freed page is never read -------------------------------------------------------------
def test_poisoned_stale_page_read_fails_loudly():
    st_ = _store()
    enable_poison(st_)
    k, v = _kv(2 * P + 3)
    loc = torch.arange(P, 3 * P + 3)
    for layer in range(2):
        st_.write(layer, loc, k, v)
    _read(st_, loc)                                       # live pages read fine
    tier, phys, stage = int(st_.table.tier_of[1]), int(st_.table.phys_of[1]), int(st_.table.stage_of[3])
    st_.release(torch.tensor([1, 3]))
    with pytest.raises(PageTableError, match="read after free"):
        _read(st_, loc)                                   # the table itself refuses freed pages
    st_.table.tier_of[1], st_.table.phys_of[1], st_.table.stage_of[3] = tier, phys, -1
    with pytest.raises(PoisonedReadError, match=r"page\(s\) \[1\] of the batch plan are poisoned"):
        _read(st_, loc[:2 * P])                           # a stale table entry hits poison
    st_.table.tier_of[1], st_.table.stage_of[3] = -1, stage
    with pytest.raises(PoisonedReadError, match=r"page\(s\) \[3\] of the batch plan are poisoned"):
        _read(st_, torch.cat([loc[P:2 * P], loc[2 * P:]]))      # a stale staging slot hits poison


# -- 2. hypothesis-driven sequences over SGLang's allocator + radix cache + the sphkv pool ----------------
def _stack(pages=16):
    pytest.importorskip("sglang")
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    from sphkv_sglang.allocator import SphKVPagedAllocator
    from sphkv_sglang.pool import SphKVPool
    from sphkv_sglang.radix import SphKVRadixCache

    cfg = SphKVServeConfig(page_size=P, max_running_requests=3, tier_fractions=(0.6, 0.4))
    pool = SphKVPool(pages * P, P, torch.bfloat16, 2, 64, 2, "cpu", False, sphkv_config=cfg)
    enable_poison(pool.store)
    alloc = SphKVPagedAllocator(pages * P, P, torch.bfloat16, "cpu", pool, False)
    cache = SphKVRadixCache(CacheInitParams(disable=False, req_to_token_pool=None,
                                            token_to_kv_pool_allocator=alloc, page_size=P))
    return SimpleNamespace(pool=pool, alloc=alloc, cache=cache, store=pool.store)


def _write(s, slots, seed):
    k, v = _kv(slots.numel(), seed=seed)
    for layer in range(2):
        s.pool.set_kv_buffer(SimpleNamespace(layer_id=layer), slots, k.bfloat16(), v.bfloat16())


def _snapshot(s, node):
    """Tier and coded bytes (both layers) of the pages on a node's path (a split keeps the path)."""
    pages = s.cache.path_device_indices(node).to(torch.int64)[::P] // P
    tiers = s.store.table.tier_of[pages].clone()
    out = []
    for layer in range(2):
        for t in torch.unique(tiers).tolist():
            phys = s.store.table.phys_of[pages[tiers == t]].long()
            out.append(s.store._view(t, layer, "k_codes")[phys].clone())
            out.append(s.store._view(t, layer, "k_radius")[phys].clone())
            out.append(s.store._view(t, layer, "v_codes")[phys].clone())
    return tiers, out


_OPS = st.lists(st.tuples(st.sampled_from(["insert", "insert", "extend", "lock", "unlock", "running", "finish",
                                           "evict", "read", "flush"]),
                          st.integers(0, 7), st.integers(1, 4)), min_size=4, max_size=28)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS)
def test_pool_invariants_under_random_sequences(ops):
    """Allocations, writes, radix inserts, locks, running requests with partial pages, demotion
    (implicit, under tier pressure), eviction and flush, in any order, with freed pages poisoned:
    the page table stays consistent, locked nodes keep their tier and bytes, sharers read identical
    bytes, and once everything is unlocked and evicted (or flushed) the free space is exactly the
    start's."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    s = _stack()
    free0, phys0 = s.alloc.available_size(), list(s.store.phys_pages)
    seqs: list[list[int]] = []           # token sequences inserted so far
    locked: list = []                    # (node, snapshot)
    running: list = []                   # slots of running requests (a partial page each, not in the tree)
    seed = 0
    for op, a, b in ops:
        seed += 1
        if op in ("insert", "extend"):
            base = seqs[a % len(seqs)][: P * (1 + a % 2)] if op == "extend" and seqs else []
            tokens = base + [10_000 + seed * 100 + i for i in range(b * P)]
            need = len(tokens) - len(base)
            if s.alloc.available_size() < need:
                s.cache.evict(EvictParams(num_tokens=need))
            if s.alloc.available_size() < need:
                continue
            m = s.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
            prefix = s.cache.path_device_indices(m.last_device_node).to(torch.int64)
            new = s.alloc.alloc(len(tokens) - prefix.numel())
            if new is None:
                continue
            try:
                _write(s, new, seed)
            except PageTableError as e:                  # staging exhausted is the only allowed refusal
                assert "staging exhausted" in str(e)
                s.alloc.free(new)
                continue
            s.cache.insert(InsertParams(key=RadixKey(array("q", tokens)), value=torch.cat([prefix, new])))
            seqs.append(tokens)
        elif op == "lock" and seqs:
            m = s.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", seqs[a % len(seqs)]))))
            if m.last_device_node is not s.cache.root_node:
                s.cache.inc_lock_ref(m.last_device_node)
                locked.append((m.last_device_node, _snapshot(s, m.last_device_node)))
        elif op == "unlock" and locked:
            node, _ = locked.pop(a % len(locked))
            s.cache.dec_lock_ref(node)
        elif op == "running" and s.alloc.available_size() >= P:
            slots = s.alloc.alloc(P)
            try:
                _write(s, slots[: 1 + a % (P - 1)], seed)
            except PageTableError as e:
                assert "staging exhausted" in str(e)
                s.alloc.free(slots)
                continue
            running.append(slots)
        elif op == "finish" and running:
            s.alloc.free(running.pop(a % len(running)))
        elif op == "evict":
            s.cache.evict(EvictParams(num_tokens=b * P))
        elif op == "read" and seqs:
            key = seqs[a % len(seqs)]
            ms = [s.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", key[:P] + [c] * P))))
                  for c in (1, 2)]
            if ms[0].device_prefix_len:
                paths = [s.cache.path_device_indices(m.last_device_node) for m in ms]
                n = min(x.numel() for x in paths)
                plans = [_read(s.store, x[:n]) for x in paths]
                for name in ("indices", "page_tiers", "page_lens", "pages"):      # the same pages, read alike
                    assert torch.equal(plans[0][name], plans[1][name])
        elif op == "flush" and not locked and not running:
            s.cache.reset()
            s.alloc.clear()
            seqs.clear()
        s.store.table.check()
        for node, (tiers, data) in locked:
            now_tiers, now = _snapshot(s, node)
            assert torch.equal(tiers, now_tiers), "a locked node was demoted"
            assert all(torch.equal(x, y) for x, y in zip(data, now)), "a locked node's bytes changed"
            _read(s.store, s.cache.path_device_indices(node))   # never poisoned
    for node, _ in locked:
        s.cache.dec_lock_ref(node)
    for slots in running:
        s.alloc.free(slots)
    s.cache.evict(EvictParams(num_tokens=10 ** 6))
    s.store.table.check()
    assert s.alloc.available_size() == free0
    assert s.store.table.counts() == {"coded": [0] * len(phys0), "staging": 0, "free_phys": phys0, "phys": phys0}


def _decode_outputs(poison: bool) -> list[torch.Tensor]:
    """Outputs of a 2-layer backend over a sphkv pool: one prefill, then 12 decode steps in which each of two
    requests fills a page (page 16; prompts of 20 and 27 tokens)."""
    from sphkv_sglang.testing import SeamBackend

    p, b = 16, 2
    rt = torch.stack([torch.arange((1 + r * 8) * p, (9 + r * 8) * p, dtype=torch.int32) for r in range(b)])
    forward = SeamBackend(rt, page_size=p, kv_heads=2, group=3, head_dim=64, seed=0,
                          prepare_pool=(lambda pool: enable_poison(pool.store)) if poison else None).forward

    lens = [20, 27]
    out = [forward(lens, [0, 0], False)]
    for _ in range(12):
        out.append(forward([1, 1], lens, True))
        lens = [x + 1 for x in lens]
    return out


def test_poison_mode_does_not_change_decode_outputs():
    """The last layer of a decode step that completes a page still reads that page's staging slot (freed by the
    layer's own write): poisoning must wait for the next forward, so poison mode serves the same outputs."""
    pytest.importorskip("sglang")
    plain, poisoned = _decode_outputs(False), _decode_outputs(True)
    for step, (a, b) in enumerate(zip(plain, poisoned)):
        assert torch.equal(a, b), f"step {step}: poison mode changed the outputs by {float((a - b).abs().max())}"
