# SPDX-License-Identifier: Apache-2.0
"""The allocator's safeguards: never worse than the best uniform tier that fits, the floor, per-layer distortion."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sphkv.retention import TierCosts, allocate, protected_mask
from sphkv.retention.allocation import band_tiers


def objective(tiers: torch.Tensor, u: torch.Tensor, dist: torch.Tensor, drop: float) -> float:
    """Independent recount of ``Σ u·D[layer, tier]`` (drop costs ``drop``)."""
    d = torch.cat([dist, torch.full((dist.shape[0], 1), drop, dtype=torch.float64)], 1)      # [L, T+1]
    per = torch.gather(d[:, None, :].expand(-1, u.shape[1], -1), 2, tiers.to(torch.int64))
    return float((per * u.to(torch.float64)).sum())


def packed_bytes(tiers: torch.Tensor, costs: TierCosts) -> int:
    counts = torch.stack([(tiers == t).sum(-1) for t in range(costs.num_tiers)], -1)
    return int(((counts + costs.page_size - 1) // costs.page_size * torch.tensor(costs.page_bytes)).sum())


def uniform_objectives(u, prot, costs, dist, budget):
    """``{tier: objective}`` of every uniform plan (protected at tier 0, the rest at one tier) that fits."""
    out = {}
    for t in range(costs.num_tiers):
        tiers = torch.full(u.shape, t, dtype=torch.int8)
        tiers[..., prot] = 0
        if packed_bytes(tiers, costs) <= budget:
            out[t] = objective(tiers, u, dist, costs.drop_distortion)
    return out


def random_costs(page: int, gen: torch.Generator, layers: int):
    per_tok = [256, 136, 72, 40]
    costs = TierCosts(("dense", "t8", "t4", "t2"), tuple(page * b + 8 for b in per_tok), (0.0, 0.01, 0.1, 0.5),
                      page_size=page)
    base = torch.tensor([0.0, 0.01, 0.1, 0.5], dtype=torch.float64)
    scale = torch.rand(layers, 1, generator=gen, dtype=torch.float64) * 3 + 0.05
    dist = (base * scale).clamp_max(0.99).cummax(1).values
    return costs, dist


def random_case(l, h, n, page, sinks, recent, frac, skew, seed):
    """Seeded tier costs, layer distortions, utilities ``[l, h, n]``, protection and a budget that lies
    the fraction ``frac`` of the way from the protected tokens' bytes to every token at the top tier."""
    gen = torch.Generator().manual_seed(seed)
    costs, dist = random_costs(page, gen, l)
    u = torch.rand(l, h, n, generator=gen, dtype=torch.float64) ** skew
    prot = protected_mask(n, sinks=sinks, recent=recent)
    minimum = l * h * -(-int(prot.sum()) // page) * costs.page_bytes[0]
    full = l * h * -(-n // page) * costs.page_bytes[0]
    budget = int(max(minimum, 1) + frac * (full - minimum))
    return u, costs, dist, prot, budget


def check_guard(l, h, n, page, sinks, recent, frac, skew, floor, seed):
    u, costs, dist, prot, budget = random_case(l, h, n, page, sinks, recent, frac, skew, seed)
    plan = allocate(u, costs, budget, protected=prot, layer_distortion=dist, floor=floor)
    assert plan.stored_bytes <= budget and plan.stored_bytes == packed_bytes(plan.tiers, costs)
    got = objective(plan.tiers, u, dist, costs.drop_distortion)
    assert got == pytest.approx(plan.expected_distortion, rel=1e-9, abs=1e-9)
    uni = uniform_objectives(u, prot, costs, dist, budget)
    if uni:
        assert got <= min(uni.values()) * (1 + 1e-9) + 1e-12, (plan.source, got, uni)
    if floor and (costs.num_tiers - 1) in uni:       # the floor fits: nothing dropped
        assert not bool((plan.tiers == plan.drop).any()) and plan.floor
    return plan


@settings(max_examples=150, deadline=None)
@given(l=st.integers(1, 4), h=st.integers(1, 3), n=st.integers(8, 300), page=st.sampled_from([4, 16, 64]),
       sinks=st.integers(0, 4), recent=st.integers(0, 16), frac=st.floats(0.02, 1.0),
       skew=st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0, 8.0]), floor=st.booleans(), seed=st.integers(0, 10 ** 6))
def test_never_worse_than_the_best_uniform_tier_that_fits(l, h, n, page, sinks, recent, frac, skew, floor, seed):
    check_guard(l, h, n, page, sinks, recent, frac, skew, floor, seed)


# Inputs where the Lagrangian + greedy fix-up alone ends worse than a uniform tier (found by random search
# with the guard disabled): near-flat utility, 16-token pages, partial dense pages for the protected tokens.
@pytest.mark.parametrize("case", [
    dict(l=1, h=1, n=75, page=16, sinks=2, recent=13, frac=0.746, skew=0.1, floor=False, seed=75),
    dict(l=2, h=2, n=89, page=16, sinks=4, recent=10, frac=0.542, skew=0.1, floor=False, seed=185),
    dict(l=3, h=1, n=99, page=16, sinks=1, recent=5, frac=0.632, skew=0.1, floor=True, seed=441),
    dict(l=2, h=2, n=301, page=16, sinks=0, recent=1, frac=0.582, skew=0.1, floor=False, seed=651),
])
def test_guard_fixes_cases_where_the_lagrangian_loses_to_uniform(case):
    plan = check_guard(**case)
    assert plan.source.startswith("uniform:")


def test_guard_picks_the_uniform_tier_when_the_utility_is_flat():
    """Flat utility, a dense page per head that the Lagrangian wants to fill: uniform 4-bit is the better answer."""
    costs = TierCosts(("dense", "t4", "t2"), (64 * 256 + 8, 64 * 72 + 8, 64 * 40 + 8), (0.0, 0.05, 0.6), page_size=64)
    n, l, h = 1024, 2, 2
    u = torch.full((l, h, n), 1.0 / n, dtype=torch.float64)
    prot = protected_mask(n, sinks=4, recent=0)
    tiers = torch.full((l, h, n), 1, dtype=torch.int8)
    tiers[..., prot] = 0
    budget = packed_bytes(tiers, costs)                 # exactly the uniform-t4 plan
    plan = allocate(u, costs, budget, protected=prot)
    uni = uniform_objectives(u, prot, costs, costs_dist(costs, l), budget)
    assert plan.expected_distortion <= uni[1] + 1e-12
    assert not bool((plan.tiers == plan.drop).any())


def costs_dist(costs: TierCosts, l: int) -> torch.Tensor:
    return torch.tensor(costs.distortion, dtype=torch.float64).expand(l, -1).clone()


def test_floor_keeps_every_token_when_the_lowest_tier_fits_and_drops_only_below_it():
    costs = TierCosts(("dense", "t4", "t2"), (64 * 256 + 8, 64 * 72 + 8, 64 * 40 + 8), (0.0, 0.05, 0.6), page_size=64)
    gen = torch.Generator().manual_seed(3)
    u = torch.rand(3, 2, 2048, generator=gen) ** 8              # skewed: most tokens look useless
    prot = protected_mask(2048, sinks=4, recent=32)
    budget = int(0.25 * 2048 * 3 * 2 * 256)                     # 4 bits per element: t2 everywhere fits
    loose = allocate(u, costs, budget, protected=prot)
    held = allocate(u, costs, budget, protected=prot, floor=True)
    assert bool((loose.tiers == loose.drop).any())             # without the floor the skewed utility drops tokens
    assert not bool((held.tiers == held.drop).any()) and held.floor
    assert held.stored_bytes <= budget
    small = allocate(u, costs, int(0.08 * 2048 * 3 * 2 * 256), protected=prot, floor=True)
    assert not small.floor and bool((small.tiers == small.drop).any())   # below the floor: drops are allowed


def test_per_layer_distortion_moves_bytes_to_the_sensitive_layer():
    costs = TierCosts(("dense", "t4", "t2"), (64 * 256 + 8, 64 * 72 + 8, 64 * 40 + 8), (0.0, 0.05, 0.3), page_size=64)
    u = torch.ones(2, 1, 1024, dtype=torch.float64)
    dist = torch.tensor([[0.0, 0.01, 0.02], [0.0, 0.2, 0.9]], dtype=torch.float64)   # layer 1 is fragile
    plan = allocate(u, costs, int(0.2 * 1024 * 2 * 256), layer_distortion=dist, floor=True)
    per_layer = plan.bytes_per_layer()
    assert per_layer[1] > per_layer[0]
    with pytest.raises(ValueError, match="layer_distortion"):
        allocate(u, costs, 10 ** 6, layer_distortion=dist[:, :2])
    with pytest.raises(ValueError, match="nondecreasing"):
        allocate(u, costs, 10 ** 6, layer_distortion=dist.flip(1))


def test_pooled_utility_is_the_max_attention_over_strided_queries():
    """By hand: a key only an early query attends to keeps its utility although the last window ignores it."""
    from sphkv.retention import RetentionInputs, make_policy, max_attention

    d, n = 4, 6
    k = torch.zeros(1, n, d)
    k[0, 1, 0] = 8.0                                  # key 1 matches query A
    k[0, 5, 1] = 8.0                                  # key 5 matches query B
    qa = torch.tensor([1.0, 0, 0, 0]) * 2
    qb = torch.tensor([0, 1.0, 0, 0]) * 2
    q = torch.stack([qa, qb])[None]                   # [Hq=1, M=2, d]
    pos = torch.tensor([2, 5])                        # A at position 2 (sees keys 0..2), B at 5
    m = max_attention(k, q, pos)
    pa = torch.softmax(torch.tensor([0.0, 16.0, 0.0]) / 2, -1)    # A over keys 0..2, scale 1/sqrt(4)
    pb = torch.softmax(torch.tensor([0.0, 0, 0, 0, 0, 16.0]) / 2, -1)
    want = torch.maximum(torch.cat([pa, torch.zeros(3)]), pb)
    assert torch.allclose(m[0], want, atol=1e-6)
    u = make_policy("pooled", kernel=1).score(RetentionInputs(k=k, q=q, q_positions=pos))
    snap = make_policy("snapkv", kernel=1).score(RetentionInputs(k=k, q=q[:, 1:]))    # the last query only
    assert float(u[0, 1]) > 0.9 and float(snap[0, 1]) < 1e-3


# -- the band (spread): a trust region around the uniform rate ------------------------------------------
def check_band(l, h, n, page, sinks, recent, frac, skew, spread, seed, lift=0):
    u, costs, dist, prot, budget = random_case(l, h, n, page, sinks, recent, frac, skew, seed)
    plan = allocate(u, costs, budget, protected=prot, layer_distortion=dist, spread=spread, lift=lift)
    free = allocate(u, costs, budget, protected=prot, layer_distortion=dist, floor=True)
    assert plan.stored_bytes <= budget and plan.stored_bytes == packed_bytes(plan.tiers, costs)
    band = band_tiers(torch.full((l * h,), int(prot.sum())), n, costs.page_bytes, page, budget, spread, lift)
    if band is None:                                        # below every uniform tier: the floor rules apply
        assert plan.source == free.source and torch.equal(plan.tiers, free.tiers)
        return plan
    top, bottom = band
    ptier = max(top - lift, 0)
    uu = torch.where(prot, 0.0, u)                          # the objective counts unprotected tokens
    got = objective(plan.tiers, uu, dist, costs.drop_distortion)
    assert got == pytest.approx(plan.expected_distortion, rel=1e-9, abs=1e-9)
    assert plan.source.startswith(f"band:{costs.names[top]}..{costs.names[bottom]}") and plan.floor
    assert bool((plan.tiers[..., prot] == ptier).all())
    rest = plan.tiers[..., ~prot]
    assert bool((rest >= top).all()) and bool((rest <= bottom).all())        # nothing dropped, nothing outside
    # the band's floor is the most precise tier that fits: one tier more precise does not
    if bottom > 0:
        up = bottom - 1
        tp = max(max(up - spread, 0) - lift, 0)
        tiers = torch.full(u.shape, up, dtype=torch.int8)
        tiers[..., prot] = tp
        assert packed_bytes(tiers, costs) > budget
    # every unprotected token is at least as precise as in any uniform plan that fits: never worse than those
    for t, val in uniform_objectives(uu, prot, costs, dist, budget).items():
        assert got <= val * (1 + 1e-9) + 1e-12, (t, got, val)
    return plan


@settings(max_examples=100, deadline=None)
@given(l=st.integers(1, 3), h=st.integers(1, 3), n=st.integers(8, 300), page=st.sampled_from([4, 16, 64]),
       sinks=st.integers(0, 4), recent=st.integers(0, 16), frac=st.floats(0.02, 1.0),
       skew=st.sampled_from([0.0, 0.5, 3.0, 8.0]), spread=st.integers(0, 3), lift=st.integers(0, 2),
       seed=st.integers(0, 10 ** 6))
def test_band_stays_within_its_tiers_and_never_loses_to_a_uniform_tier(l, h, n, page, sinks, recent, frac, skew,
                                                                        spread, lift, seed):
    check_band(l, h, n, page, sinks, recent, frac, skew, spread, seed, lift)


def test_band_at_the_4bit_rate_keeps_skewed_utility_near_uniform():
    """At a budget just under uniform t4 the free plan spreads over every tier; the band uses t4 and t2 only,
    protected tokens at t4, and puts on t2 only the least useful tokens of each head."""
    costs = TierCosts(("dense", "t4", "t2"), (64 * 256 + 8, 64 * 72 + 8, 64 * 40 + 8), (0.0, 0.05, 0.6), page_size=64)
    gen = torch.Generator().manual_seed(5)
    n, l, h = 1024, 2, 2
    u = torch.rand(l, h, n, generator=gen, dtype=torch.float64) ** 8
    prot = protected_mask(n, sinks=4, recent=32)
    budget = l * h * (n // 64 - 1) * costs.page_bytes[1] + l * h * costs.page_bytes[2]     # one t2 page per head
    free = allocate(u, costs, budget, protected=prot, floor=True)
    plan = allocate(u, costs, budget, protected=prot, spread=1)
    assert bool((free.tiers == 0).sum() > (prot.sum() * l * h))           # the free plan promotes tokens to dense
    assert plan.source.startswith("band:t4..t2"), plan.source
    assert not bool((plan.tiers == 0).any()) and not bool((plan.tiers == plan.drop).any())
    low = plan.tiers == 2
    assert 0 < int(low.sum()) <= l * h * 64                                 # at most one page per head on t2
    for i in range(l):
        for j in range(h):
            kept_u, low_u = u[i, j][~low[i, j] & ~prot], u[i, j][low[i, j]]
            assert float(low_u.max()) <= float(kept_u.min())                # the least useful tokens go down


def test_band_config_validation():
    from sphkv.retention import RetentionConfig

    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="spread"):
            RetentionConfig(spread=bad)
        with pytest.raises(ValueError, match="lift"):
            RetentionConfig(lift=bad)
    with pytest.raises(ValueError, match="spread"):
        band_tiers(torch.tensor([4]), 64, (100, 50), 16, 10 ** 6, -2)


def test_band_lift_keeps_protected_tokens_on_their_own_more_precise_pages():
    costs = TierCosts(("dense", "t4", "t2"), (64 * 256 + 8, 64 * 72 + 8, 64 * 40 + 8), (0.0, 0.05, 0.6), page_size=64)
    n, l, h = 1024, 2, 2
    u = torch.rand(l, h, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    prot = protected_mask(n, sinks=4, recent=32)
    budget = l * h * (costs.page_bytes[0] + 16 * costs.page_bytes[2] + 8 * (costs.page_bytes[1] - costs.page_bytes[2]))
    plan = allocate(u, costs, budget, protected=prot, spread=1, lift=1)
    assert plan.source.startswith("band:t4..t2+protected:dense/"), plan.source
    assert bool((plan.tiers[..., prot] == 0).all()) and not bool((plan.tiers[..., ~prot] == 0).any())
    assert plan.stored_bytes == packed_bytes(plan.tiers, costs) <= budget
    assert torch.equal(plan.pages[..., 0], torch.ones(l, h, dtype=torch.int64))
    with pytest.raises(ValueError, match="same protected positions"):
        p2 = prot.expand(l, h, n).clone()
        p2[0, 0, 100] = True
        allocate(u, costs, budget, protected=p2, spread=1, lift=1)


def test_band_protected_replaces_the_protection_inside_the_band_only():
    costs = TierCosts(("dense", "t4", "t2"), (64 * 256 + 8, 64 * 72 + 8, 64 * 40 + 8), (0.0, 0.05, 0.6), page_size=64)
    n, l, h = 1024, 2, 2
    u = torch.rand(l, h, n, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    prot = protected_mask(n, sinks=4, recent=32)
    first = protected_mask(n, sinks=64, recent=0)
    budget = l * h * (costs.page_bytes[0] + 15 * costs.page_bytes[2] + 8 * (costs.page_bytes[1] - costs.page_bytes[2]))
    plan = allocate(u, costs, budget, protected=prot, spread=1, lift=1, band_protected=first)
    assert bool((plan.tiers[..., first] == 0).all()) and not bool((plan.tiers[..., ~first] == 0).any())
    assert plan.stored_bytes == packed_bytes(plan.tiers, costs) <= budget
    low = allocate(u, costs, l * h * 30000, protected=prot, spread=1, lift=1, band_protected=first)   # below the floor
    assert not low.source.startswith("band") and bool((low.tiers[..., prot] == 0).all())
