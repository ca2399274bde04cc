# SPDX-License-Identifier: Apache-2.0
"""Prefill compression entry points for the harness: ADA + RDR, RDKV-style grid tiers, pure eviction."""
from __future__ import annotations

import json

import pytest
import torch

from sphkv.retention import VARIANTS, RetentionConfig, compress_prefill, compress_variant, eviction_tierset

L, HKV, HQ, N, W = 3, 2, 6, 512, 16


def _prefill(seed=0, needle=200):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(1, HKV, N, 64, generator=g) for _ in range(L)]
    values = [torch.randn(1, HKV, N, 64, generator=g) for _ in range(L)]
    queries = [torch.randn(1, HQ, W, 64, generator=g) for _ in range(L)]
    for l in range(L):                         # every window query looks at the needle token
        keys[l][0, :, needle] = 0.0
        keys[l][0, :, needle, 0] = 12.0
        queries[l][0, :, :, 0] = 3.0
    return keys, values, queries


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_variants_respect_budget_and_report_exact_bytes(name, fraction):
    keys, values, queries = _prefill()
    res = compress_variant(name, keys, values, queries, fraction, page_size=16)
    budget = int(fraction * L * HKV * N * 64 * 4)
    assert res.plan.budget_bytes == budget
    assert res.stored_bytes == res.plan.stored_bytes <= budget
    assert res.bits_per_element <= 16 * fraction + 1e-9
    assert res.tierset.distortion and (res.tierset.distortion[0] == 0.0) == res.tierset.tiers[0].dense
    summary = res.summary()
    json.dumps(summary)
    assert summary["metadata_overhead"] <= 0.02 and summary["budget_fraction"] == fraction
    assert len(summary["bytes_per_layer"]) == L
    # the needle and the protected tokens are kept at the most precise tier
    assert bool((res.plan.tiers[:, :, 200] == 0).all())
    assert bool((res.plan.tiers[:, :, :4] == 0).all()) and bool((res.plan.tiers[:, :, -32:] == 0).all())


def test_segments_and_dense_view_agree_with_the_plan():
    keys, values, queries = _prefill(1)
    res = compress_variant("ada+rdr", keys, values, queries, 0.2, page_size=16)
    for layer in range(L):
        k_hat, v_hat, keep = res.dense_view(layer)
        for h, segs in enumerate(res.layer_segments(layer)):
            for seg in segs:
                assert torch.equal(seg.positions, (res.plan.tiers[layer, h] == seg.tier).nonzero().flatten())
                assert seg.name == res.tierset.tiers[seg.tier].name
                assert torch.equal(k_hat[0, h, seg.positions], seg.k)
            dense = [s for s in segs if s.tier == 0][0]
            assert torch.equal(dense.k, keys[layer][0, h, dense.positions].to(torch.bfloat16).float())
        assert not bool(k_hat[0][~keep[0]].any())


def test_rdkv_and_eviction_tiers_and_budget_bytes():
    keys, values, queries = _prefill(2)
    rd = compress_variant("rdkv", keys, values, queries, 0.15, page_size=16)
    assert [t.name for t in rd.tierset.tiers] == ["bf16", "int8", "int4", "int2"]
    assert rd.tierset.distortion[1] < rd.tierset.distortion[2] < rd.tierset.distortion[3]
    ev = compress_prefill(keys, values, queries, eviction_tierset(page_size=16), budget_bytes=150_000)
    assert ev.stored_bytes <= 150_000 and set(ev.plan.tiers.unique().tolist()) <= {0, 1}
    assert ev.summary()["tiers"] == ["dense"]


def test_bad_inputs_are_rejected():
    keys, values, queries = _prefill(3)
    with pytest.raises(ValueError, match="not registered"):
        RetentionConfig(policy="lru")
    with pytest.raises(ValueError, match="kernel"):
        RetentionConfig(kernel=4)
    with pytest.raises(ValueError, match="variant"):
        compress_variant("kivi", keys, values, queries, 0.1)
    with pytest.raises(ValueError, match="fraction"):
        compress_variant("ada+rdr", keys, values, queries, 0.0)
    with pytest.raises(ValueError, match="minimum"):
        compress_variant("ada+rdr", keys, values, queries, 0.01)
    with pytest.raises(ValueError, match="one entry per layer"):
        compress_variant("ada+rdr", keys, values[:1], queries, 0.1)


def test_h2o_policy_and_debug_store():
    keys, values, _ = _prefill(4)
    all_queries = [torch.randn(1, HQ, N, 64) for _ in range(L)]
    cfg = RetentionConfig(policy="h2o", sinks=0, recent=8, debug=True)
    res = compress_prefill(keys, values, all_queries, eviction_tierset(page_size=16), 0.2, config=cfg)
    assert res.store.debug and res.stored_bytes <= res.plan.budget_bytes
    assert bool((res.plan.tiers[..., -8:] == 0).all())
