# SPDX-License-Identifier: Apache-2.0
"""Utility estimation: observation window by hand, pooling, GQA grouping, priors, decode accumulation."""
from __future__ import annotations

import math

import pytest
import torch

from sphkv import AngleKeyCodec, GroupValueQuantizer, SphKVConfig, attention_from_codes
from sphkv.retention import (POLICIES, AttentionMassTracker, RetentionInputs, layer_utility, make_policy,
                             protected_mask, window_attention)


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [x / sum(e) for x in e]


def test_observation_window_by_hand():
    # one kv head, two query heads, N = 4 keys, W = 2 window queries at positions 2 and 3, d = 2, scale 1
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]])
    q = torch.tensor([[[2.0, 0.0], [0.0, 1.0]],          # query head 0: queries at positions 2, 3
                      [[0.0, 3.0], [1.0, 1.0]]])         # query head 1
    u = make_policy("snapkv", kernel=1).score(RetentionInputs(k=k, q=q, sm_scale=1.0))
    expected = [0.0] * 4
    for head in q.tolist():
        for pos, qq in zip((2, 3), head):
            logits = [qq[0] * kk[0] + qq[1] * kk[1] for kk in k[0].tolist()[:pos + 1]]
            for i, p in enumerate(_softmax(logits)):
                expected[i] += p / 2                      # mean over the 2 window queries, summed over heads
    assert u.shape == (1, 4)
    assert u[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert float(u.sum()) == pytest.approx(2.0)           # each query head spreads mass 1 per step


def test_pooling_avg_and_max():
    k = torch.zeros(1, 5, 2)
    q = torch.zeros(1, 1, 2)                              # one query at position 4: uniform 0.2 over 5 keys
    k[0, 2, 0] = 10.0
    q[0, 0, 0] = 1.0
    raw = make_policy("snapkv", kernel=1).score(RetentionInputs(k=k, q=q, sm_scale=1.0))[0]
    avg = make_policy("snapkv", kernel=3, pool="avg").score(RetentionInputs(k=k, q=q, sm_scale=1.0))[0]
    mx = make_policy("snapkv", kernel=3, pool="max").score(RetentionInputs(k=k, q=q, sm_scale=1.0))[0]
    assert avg[0] == pytest.approx(float(raw[:2].mean()))            # edges average over the valid part
    assert avg[2] == pytest.approx(float(raw[1:4].mean()))
    assert mx[1] == pytest.approx(float(raw[2])) and mx[3] == pytest.approx(float(raw[2]))


def test_gqa_groups_sum_their_query_heads():
    g = torch.Generator().manual_seed(0)
    k, q = torch.randn(2, 30, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    per_q = window_attention(k, q)                                      # [4, 30]
    u = make_policy("snapkv", kernel=1).score(RetentionInputs(k=k, q=q))
    assert torch.allclose(u, torch.stack([per_q[0] + per_q[1], per_q[2] + per_q[3]]) / 5, atol=1e-6)
    assert torch.allclose(u.sum(-1), torch.full((2,), 2.0), atol=1e-5)
    assert bool((per_q[:, :25].sum(-1) > 0).all()) and torch.allclose(per_q.sum(-1), torch.full((4,), 5.0))


def test_window_queries_are_causal():
    k, q = torch.randn(1, 10, 8), torch.randn(1, 3, 8)
    att = window_attention(k, q, torch.tensor([2, 5, 9]))
    expected = torch.zeros(10)
    for pos, qq in zip((2, 5, 9), q[0]):
        expected[:pos + 1] += torch.softmax(k[0, :pos + 1] @ qq / 8 ** 0.5, 0)
    assert torch.allclose(att[0], expected, atol=1e-6)


def test_layer_utility_stacks_layers_and_h2o_uses_all_queries():
    ks = [torch.randn(1, 2, 40, 8) for _ in range(3)]
    qs = [torch.randn(1, 4, 40, 8) for _ in range(3)]
    u = layer_utility(make_policy("h2o"), ks, qs)
    assert u.shape == (3, 2, 40)
    assert torch.allclose(u.sum(-1), torch.full((3, 2), 2.0), atol=1e-5)
    assert float(u[..., 0].mean()) > float(u[..., -1].mean())        # early keys are seen by more queries


def test_registry_priors_and_simple_policies():
    assert {"snapkv", "h2o", "mass", "recency", "uniform"} <= set(POLICIES)
    with pytest.raises(ValueError, match="not registered"):
        make_policy("lru")
    with pytest.raises(ValueError, match="pool"):
        make_policy("snapkv", pool="median")
    rec = make_policy("recency").score(RetentionInputs(num_tokens=4, num_kv_heads=2))
    assert rec.shape == (2, 4) and bool((rec.diff(dim=-1) > 0).all())
    assert make_policy("uniform").score(RetentionInputs(num_tokens=4, num_kv_heads=1)).tolist() == [[0.25] * 4]
    mask = protected_mask(10, sinks=2, recent=3)
    assert mask.tolist() == [True, True] + [False] * 5 + [True] * 3
    assert protected_mask(3, sinks=2, recent=5).all()


def test_decode_mass_from_attention_from_codes_feeds_the_tracker():
    cfg = SphKVConfig.from_name("sphkv-4", head_dim=64, page_size=16)
    kc, vq = AngleKeyCodec(cfg), GroupValueQuantizer(cfg)
    k, v = torch.randn(1, 2, 32, 64), torch.randn(1, 2, 32, 64)
    tail_k, tail_v = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64)
    q = torch.randn(1, 6, 1, 64)
    _, mass = attention_from_codes(q, kc.encode(k), vq.encode(v), kc, vq, dense_k=tail_k, dense_v=tail_v,
                                   return_key_mass=True)
    assert torch.allclose(mass.sum(-1), torch.full((1, 2), 3.0), atol=1e-5)   # 3 query heads per group
    tracker = AttentionMassTracker(torch.zeros(1, 2, 32), decay=0.5)
    tracker.update(0, mass[0])                                               # grows to 33 tokens
    u = tracker.utility()
    assert u.shape == (1, 2, 33) and torch.allclose(u[0], 0.5 * mass[0])
    policy_u = make_policy("mass").score(RetentionInputs(mass=u[0]))
    assert torch.equal(policy_u, u[0])
    summed = AttentionMassTracker(torch.ones(1, 1, 2), mode="sum")
    summed.update(0, torch.tensor([[1.0, 2.0]]), torch.tensor([1, 3]))
    assert summed.utility().tolist() == [[[1.0, 2.0, 0.0, 2.0]]]
