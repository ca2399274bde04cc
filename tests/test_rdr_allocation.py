# SPDX-License-Identifier: Apache-2.0
"""Budgeted allocation: exact packed bytes, invariants, bad budgets, optimality on small cases."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sphkv.retention import TierCosts, allocate, budget_from_fraction, protected_mask
from sphkv.tiers import TierSet

COSTS = TierCosts(("dense", "sphkv-4", "sphkv-2"), (16392, 4360, 2440), (0.0, 0.1, 0.4), page_size=64)


def packed_bytes(tiers: torch.Tensor, costs: TierCosts) -> int:
    """Independent recount: whole pages per (layer, head, tier) times page bytes."""
    total = 0
    for t, pb in enumerate(costs.page_bytes):
        counts = (tiers == t).sum(-1)
        total += int(((counts + costs.page_size - 1) // costs.page_size).sum()) * pb
    return total


def utilities(l=3, h=2, n=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(l, h, n, generator=g) ** 6


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5, 0.9])
def test_budget_respected_exactly_on_packed_bytes(fraction):
    u = utilities(n=2000)
    prot = protected_mask(2000, sinks=4, recent=16)
    budget = budget_from_fraction(fraction, 2000, 3, 2, 64)
    plan = allocate(u, COSTS, budget, protected=prot)
    assert plan.stored_bytes <= budget
    assert plan.stored_bytes == packed_bytes(plan.tiers, COSTS)
    assert int(plan.bytes_per_head().sum()) == plan.stored_bytes
    # used as fully as the move set allows: a dropped token left means no last-tier page fits
    if bool((plan.tiers == plan.drop).any()):
        assert budget - plan.stored_bytes < COSTS.page_bytes[-1]


def test_protected_tokens_kept_at_tier0_and_order_follows_utility():
    u = utilities()
    prot = protected_mask(700, sinks=4, recent=16)
    plan = allocate(u, COSTS, budget_from_fraction(0.1, 700, 3, 2, 64), protected=prot)
    assert bool((plan.tiers[..., prot] == 0).all())
    tiers = plan.tiers[..., ~prot].to(torch.int64)
    uu = u[..., ~prot]
    for l, h in itertools.product(range(3), range(2)):
        order = uu[l, h].argsort(descending=True)
        assert bool((tiers[l, h, order].diff() >= 0).all()), "a more useful token got a coarser tier"


def test_everything_fits_at_tier0():
    u = utilities(n=128)
    plan = allocate(u, COSTS, 10 ** 9)
    assert bool((plan.tiers == 0).all()) and plan.lam == 0.0


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), -float("inf")])
def test_bad_budgets_rejected(bad):
    with pytest.raises(ValueError, match="budget_bytes"):
        allocate(utilities(), COSTS, bad)


def test_budget_below_protected_minimum_names_value_and_minimum():
    prot = protected_mask(700, sinks=4, recent=16)
    minimum = 3 * 2 * COSTS.page_bytes[0]                  # 20 protected tokens → one dense page per head
    with pytest.raises(ValueError, match=rf"budget_bytes=50000 is below the minimum {minimum}"):
        allocate(utilities(), COSTS, 50000, protected=prot)
    plan = allocate(utilities(), COSTS, minimum, protected=prot)   # exactly the minimum is fine
    assert plan.stored_bytes == minimum


def test_bad_fraction_and_bad_utility_rejected():
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            budget_from_fraction(bad, 10, 1, 1, 64)
    u = utilities()
    u[0, 0, 5] = float("nan")
    with pytest.raises(ValueError, match="utility"):
        allocate(u, COSTS, 10 ** 6)
    with pytest.raises(ValueError, match="distortion"):
        TierCosts(("a", "b"), (100, 50), (0.5, 0.1), page_size=4)
    with pytest.raises(ValueError, match="page_bytes"):
        TierCosts(("a", "b"), (50, 100), (0.0, 0.1), page_size=4)
    with pytest.raises(ValueError, match="calibrate"):
        TierCosts.from_tierset(TierSet.default())


def test_per_layer_budgets_fall_out_of_the_optimization():
    n = 1024
    u = torch.empty(2, 1, n)
    u[0, 0] = 1e-4
    u[0, 0, :40] = 1.0                                   # layer 0: attention on 40 tokens
    u[1, 0] = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5   # layer 1: spread out
    plan = allocate(u, COSTS, budget_from_fraction(0.2, n, 2, 1, 64))
    per_layer = plan.bytes_per_layer()
    assert per_layer[1] > 2 * per_layer[0]
    assert bool((plan.tiers[0, 0, :40] < plan.drop).all())             # the few useful tokens are kept
    assert float((plan.tiers[0, 0, 40:] == plan.drop).float().mean()) > 0.75   # the rest mostly dropped


def _brute_force(u, costs, budget):
    n, t = u.numel(), costs.num_tiers
    d = list(costs.distortion) + [costs.drop_distortion]
    best = math.inf
    for assign in itertools.product(range(t + 1), repeat=n):
        counts = [assign.count(i) for i in range(t)]
        b = sum(-(-c // costs.page_size) * pb for c, pb in zip(counts, costs.page_bytes))
        if b <= budget:
            best = min(best, sum(float(u[i]) * d[a] for i, a in enumerate(assign)))
    return best


def test_optimal_at_lagrangian_budgets_and_near_optimal_elsewhere():
    costs = TierCosts(("hi", "lo"), (10, 3), (0.0, 0.3), page_size=1)
    u = torch.tensor([0.9, 0.05, 0.4, 0.2, 0.02, 0.6, 0.1])
    for lam in (0.001, 0.01, 0.03, 0.06, 0.1):
        cost = u[:, None] * torch.tensor([0.0, 0.3, 1.0]) + lam * torch.tensor([10.0, 3.0, 0.0])
        pick = cost.argmin(1)
        budget = int(sum(costs.page_bytes[int(p)] for p in pick if p < 2))
        plan = allocate(u[None, None], costs, budget)
        assert plan.expected_distortion == pytest.approx(_brute_force(u, costs, budget), abs=1e-9)
    for budget in range(3, 71, 4):
        plan = allocate(u[None, None], costs, budget)
        opt = _brute_force(u, costs, budget)
        assert opt - 1e-9 <= plan.expected_distortion <= opt + float(u.max()) + 1e-9


@settings(max_examples=40, deadline=None)
@given(l=st.integers(1, 3), h=st.integers(1, 3), n=st.integers(1, 200), page=st.sampled_from([1, 4, 16]),
       sinks=st.integers(0, 5), recent=st.integers(0, 9), frac=st.floats(0.0, 1.2), seed=st.integers(0, 10 ** 6))
def test_allocation_invariants_property(l, h, n, page, sinks, recent, frac, seed):
    costs = TierCosts(("dense", "mid", "low"), (page * 256 + 8, page * 68 + 8, page * 38 + 8), (0.0, 0.2, 0.5),
                      page_size=page)
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(l, h, n, generator=g) ** 3
    prot = protected_mask(n, sinks=sinks, recent=recent)
    minimum = l * h * -(-int(prot.sum()) // page) * costs.page_bytes[0]
    full = l * h * -(-n // page) * costs.page_bytes[0]
    budget = max(minimum, 1) + frac * (full - minimum)
    plan = allocate(u, costs, budget, protected=prot)
    assert plan.stored_bytes <= budget
    assert plan.stored_bytes == packed_bytes(plan.tiers, costs)
    assert bool((plan.tiers[..., prot] == 0).all())
    assert torch.equal(plan.counts, torch.stack([(plan.tiers == t).sum(-1) for t in range(3)], -1))
