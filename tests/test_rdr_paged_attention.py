# SPDX-License-Identifier: Apache-2.0
"""Reference attention over tier-homogeneous pages equals attention over the same decoded tokens."""
from __future__ import annotations

import pytest
import torch

from sphkv import AngleKeyCodec, GroupValueQuantizer, attention_from_codes
from sphkv.gridquant import grid_tierset
from sphkv.attention import attention_state, merge_state
from sphkv.pages import PagedStore, paged_attention
from sphkv.retention import compress_prefill, eviction_tierset, rdkv_tierset
from sphkv.tiers import TierSet


def _sdpa(q, k, v, mask=None):
    """Plain attention ``q`` [Hq, M, d] over per-kv-head ``k``, ``v`` lists of [n_h, d] (GQA)."""
    hq, m, d = q.shape
    g = hq // len(k)
    out = []
    for h in range(hq):
        s = q[h] @ k[h // g].T / d ** 0.5
        if mask is not None:
            s = s.masked_fill(mask[h // g], float("-inf"))
        out.append(torch.softmax(s, -1) @ v[h // g])
    return torch.stack(out)


def test_single_coded_tier_equals_attention_from_codes():
    ts = TierSet.default(page_size=16)
    tier = ts.tiers[1]
    kc, vq = AngleKeyCodec(tier.config), GroupValueQuantizer(tier.config)
    k, v, q = torch.randn(1, 2, 70, 64), torch.randn(1, 2, 70, 64), torch.randn(1, 6, 3, 64)
    store = PagedStore(ts, 12, num_layers=1, num_kv_heads=2)
    store.write_plan(0, k, v, torch.ones(2, 70, dtype=torch.int64))
    ours = paged_attention(q, store, 0)
    ref = attention_from_codes(q, kc.encode(k), vq.encode(v), kc, vq, causal=False)
    assert torch.allclose(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("tierset", [TierSet.default(page_size=8), grid_tierset(page_size=8)], ids=["ada", "grid"])
def test_mixed_tiers_equal_sdpa_over_decoded_kept_tokens(tierset):
    g = torch.Generator().manual_seed(0)
    n, hkv = 90, 3
    k, v = torch.randn(1, hkv, n, 64, generator=g), torch.randn(1, hkv, n, 64, generator=g)
    plan = torch.randint(0, len(tierset) + 1, (hkv, n), generator=g)                 # random tiers + drops
    plan[:, 0] = 0
    store = PagedStore(tierset, 40, num_layers=2, num_kv_heads=hkv)
    store.write_plan(1, k, v, plan)
    q = torch.randn(9, 2, 64, generator=g)
    out, mass, tail_mass = paged_attention(q, store, 1, return_key_mass=True, num_positions=n)
    kept = [store.gather(1, h) for h in range(hkv)]
    ref = _sdpa(q, [x[1] for x in kept], [x[2] for x in kept])
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4)
    # the kept tokens are the plan's, the mass is the softmax probability per original position
    for h, (pos, *_rest) in enumerate(kept):
        assert torch.equal(pos, (plan[h] < len(tierset)).nonzero().flatten())
        assert float(mass[h, plan[h] == len(tierset)].abs().sum()) == 0.0
    assert torch.allclose(mass.sum(-1), torch.full((hkv,), 6.0), atol=1e-4) and tail_mass.shape == (hkv, 0)


def test_dense_tail_is_causal_and_merged_exactly():
    ts = TierSet.default(page_size=16)
    k, v = torch.randn(2, 40, 64), torch.randn(2, 40, 64)
    tail_k, tail_v = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    store = PagedStore(ts, 10, num_layers=1, num_kv_heads=2)
    plan = torch.tensor([0] * 10 + [1] * 20 + [2] * 10).expand(2, 40)
    store.write_plan(0, k, v, plan)
    q = torch.randn(4, 3, 64)                                                        # the last 3 tail tokens
    out, mass, tail_mass = paged_attention(q, store, 0, tail_k=tail_k, tail_v=tail_v, return_key_mass=True)
    kept = [store.gather(0, h) for h in range(2)]
    ks = [torch.cat([x[1], tail_k[h]]) for h, x in enumerate(kept)]
    vs = [torch.cat([x[2], tail_v[h]]) for h, x in enumerate(kept)]
    qpos = torch.tensor([2, 3, 4])
    mask = torch.cat([torch.zeros(3, 40, dtype=torch.bool), torch.arange(5)[None] > qpos[:, None]], 1)
    ref = _sdpa(q, ks, vs, [mask, mask])
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4)
    assert torch.allclose(mass.sum(-1) + tail_mass.sum(-1), torch.full((2,), 6.0), atol=1e-4)
    # the last tail token is seen by one query only per query head → its mass is ≤ 2 (two heads per group)
    assert bool((tail_mass[:, 4] <= 2.0 + 1e-6).all())


def test_merge_states_handles_fully_masked_parts():
    s1 = torch.tensor([[1.0, 2.0], [float("-inf"), float("-inf")]])
    v1 = torch.randn(2, 4)
    s2 = torch.tensor([[0.5], [3.0]])
    v2 = torch.randn(1, 4)
    o1, l1 = attention_state(s1, v1)
    assert bool((o1[1] == 0).all()) and bool(torch.isneginf(l1[1]))       # nothing visible: zero state
    out, lse = merge_state(o1, l1, *attention_state(s2, v2))
    full = torch.cat([s1, s2], 1)
    ref = torch.softmax(full, -1) @ torch.cat([v1, v2])
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(lse, torch.logsumexp(full, -1), atol=1e-6)


@pytest.mark.parametrize("tiers", [None, "rdkv", "evict"])
def test_attention_after_allocation_equals_attention_over_kept_decoded_tokens(tiers):
    g = torch.Generator().manual_seed(1)
    layers, hkv, n = 2, 2, 400
    ks = [torch.randn(1, hkv, n, 64, generator=g) for _ in range(layers)]
    vs = [torch.randn(1, hkv, n, 64, generator=g) for _ in range(layers)]
    qs = [torch.randn(1, 4, 16, 64, generator=g) for _ in range(layers)]
    ts = {None: TierSet.default(page_size=16), "rdkv": rdkv_tierset(page_size=16),
          "evict": eviction_tierset(page_size=16)}[tiers]
    res = compress_prefill(ks, vs, qs, ts, 0.3)
    assert res.stored_bytes <= res.plan.budget_bytes
    q = torch.randn(1, 4, 1, 64, generator=g)
    for layer in range(layers):
        k_hat, v_hat, keep = res.dense_view(layer)
        assert torch.equal(keep[0], res.plan.kept()[layer])
        ref = _sdpa(q[0], [k_hat[0, h, keep[0, h]] for h in range(hkv)], [v_hat[0, h, keep[0, h]] for h in range(hkv)])
        assert torch.allclose(res.attention(layer, q)[0], ref, atol=2e-5, rtol=1e-4)
