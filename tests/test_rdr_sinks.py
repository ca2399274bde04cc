# SPDX-License-Identifier: Apache-2.0
"""RDR with dense sinks (``RetentionConfig.dense_sinks``) and the harness method's choice of queries."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sphkv.retention import RetentionConfig, compress_variant
from sphkv.tiers import PAGE_META_BYTES

L, HKV, HQ, N, W, D = 3, 2, 6, 300, 16, 64


def _prefill(seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(1, HKV, N, D, generator=g).to(torch.bfloat16).float() for _ in range(L)]
    values = [torch.randn(1, HKV, N, D, generator=g).to(torch.bfloat16).float() for _ in range(L)]
    queries = [torch.randn(1, HQ, W, D, generator=g) for _ in range(L)]
    return keys, values, queries


@pytest.mark.parametrize("fraction", [0.1, 0.25])
@pytest.mark.parametrize("spread", [None, 1])
def test_dense_sinks_are_bf16_outside_the_pages_and_paid_from_the_budget(fraction, spread):
    keys, values, queries = _prefill()
    s = 5                                                        # odd: no page boundary lines up with it
    cfg = RetentionConfig(dense_sinks=s, floor=True, spread=spread, lift=1, band_sinks=16, prior=1.0)
    res = compress_variant("ada-b+rdr", keys, values, queries, fraction, config=cfg, page_size=16)
    sink_bytes = L * HKV * (s * D * 2 * 2 + PAGE_META_BYTES)
    assert res.dense_sinks == s and res.sink_bytes == sink_bytes
    assert res.stored_bytes == res.store.bytes().stored_bytes + sink_bytes <= int(fraction * L * HKV * N * D * 4)
    assert res.plan.stored_bytes == res.store.bytes().stored_bytes            # the plan pays for the pages only
    assert res.plan.tiers.shape == (L, HKV, N - s)                           # it plans positions s..N-1
    summary = res.summary()
    assert summary["stored_bytes"] == res.stored_bytes and summary["budget_bytes"] >= res.stored_bytes
    for layer in range(L):
        k_hat, v_hat, keep = res.dense_view(layer)
        assert bool(keep[0, :, :s].all())
        assert torch.equal(k_hat[0, :, :s], keys[layer][0, :, :s])
        assert torch.equal(v_hat[0, :, :s], values[layer][0, :, :s])
        for h in range(HKV):
            pos, _, _, _ = res.store.gather(layer, h)
            assert int(pos.min()) >= s                                        # no sink in the store
            tiers = res.plan.tiers[layer, h]
            kept = (tiers < len(res.tierset)).nonzero().flatten() + s
            assert torch.equal(pos, kept)                                     # store positions = plan + offset
            segs = res.layer_segments(layer)[h]
            assert segs[0].name == "dense-sink" and torch.equal(segs[0].positions, torch.arange(s))
    with pytest.raises(ValueError, match="dense_sinks"):
        res.attention(0, queries[0][:, :, :1])


def test_dense_sinks_bad_values():
    keys, values, queries = _prefill(1)
    with pytest.raises(ValueError, match="dense_sinks"):
        RetentionConfig(dense_sinks=-1)
    with pytest.raises(ValueError, match="dense_sinks=300"):
        compress_variant("ada-b+rdr", keys, values, queries, 0.25, config=RetentionConfig(dense_sinks=N), page_size=16)
    with pytest.raises(ValueError, match="does not cover the dense sinks"):
        compress_variant("ada-b+rdr", keys, values, queries, 0.01, config=RetentionConfig(dense_sinks=200),
                         page_size=16)


def test_harness_method_gives_a_window_policy_the_window_queries():
    """A non-pooled policy on ``ada+rdr`` plans on the observation window, not the strided pooled queries
    (before: the robust variant always passed the pooled queries, whatever the policy)."""
    from benchmarks.quality.methods import PrefillContext
    from benchmarks.quality.methods_rdr import ROBUST, RDR

    keys, values, queries = _prefill(2)
    pooled_pos = torch.tensor(sorted(set(range(31, N, 32)) | set(range(N - W, N))))
    g = torch.Generator().manual_seed(3)
    pooled = [torch.randn(1, HQ, pooled_pos.numel(), D, generator=g) for _ in range(L)]
    for p, q in zip(pooled, queries):
        p[..., -W:, :] = q                                                    # the last W pooled positions
    ctx = PrefillContext([k.to(torch.bfloat16) for k in keys], [v.to(torch.bfloat16) for v in values], queries,
                         None, pooled_queries=pooled, pooled_positions=pooled_pos)
    cfg = dataclasses.replace(ROBUST, policy="snapkv", dense_sinks=4)
    method = RDR("ada+rdr", 0.25, config=cfg)
    prefix = method.build(ctx)
    want = compress_variant("ada-c+rdr", keys, values, queries, 0.25, config=cfg, page_size=64)
    assert torch.equal(method.last.plan.tiers, want.plan.tiers)
    assert torch.equal(method.last.utility, want.utility)
    assert prefix.nbytes == want.stored_bytes
    assert prefix.segments[0][0].num_tokens == 4                              # the dense sinks come first



def test_band_prior_applies_only_where_the_band_does():
    keys, values, queries = _prefill(4)
    base = RetentionConfig(floor=True, spread=1, dense_sinks=4)
    raw = compress_variant("ada-c+rdr", keys, values, queries, 0.25, config=base, page_size=16).utility
    mean = raw.mean(-1, keepdim=True)
    cfg = dataclasses.replace(base, prior=1.0, band_prior=4.0)
    band = compress_variant("ada-c+rdr", keys, values, queries, 0.25, config=cfg, page_size=16)
    assert band.plan.source.startswith("band:") and torch.allclose(band.utility, raw + 4.0 * mean)
    low = compress_variant("ada-c+rdr", keys, values, queries, 0.10, config=cfg, page_size=16)
    assert not low.plan.source.startswith("band:") and low.summary()["dropped"] > 0
    assert torch.allclose(low.utility, raw + 1.0 * mean)
    with pytest.raises(ValueError, match="band_prior"):
        RetentionConfig(band_prior=-1.0)


def test_ada_c_tier_sits_between_4b_and_3b():
    from sphkv.retention import ada_c_tierset

    ts = ada_c_tierset()
    names, pb = [t.name for t in ts.tiers], ts.page_bytes()
    assert names == ["sphkv-8", "sphkv-5b", "sphkv-4b", "sphkv-4b-a3.5", "sphkv-3b", "sphkv-2b"]
    assert all(a > b for a, b in zip(pb, pb[1:]))
    a35, b4 = ts.tiers[3].config, ts.tiers[2].config
    assert a35.value_bits == b4.value_bits and a35.angle_bits < b4.angle_bits


def test_compress_cache_refuses_dense_sinks():
    from sphkv_hf import SphKVCache
    from sphkv_hf.retention import compress_cache

    with pytest.raises(ValueError, match="dense_sinks=4"):
        compress_cache(SphKVCache(None), 0.25, config=RetentionConfig(dense_sinks=4))
