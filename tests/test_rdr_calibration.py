# SPDX-License-Identifier: Apache-2.0
"""Tier distortion calibration: dense 0, coarser tiers more distortion, drop = 1 as the unit."""
from __future__ import annotations

import pytest
import torch

from sphkv.gridquant import grid_tierset
from sphkv.retention import calibrate, eviction_tierset
from sphkv.tiers import TierSet


def _samples(seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(64, generator=g)
    k = torch.randn(2, 3, 256, 64, generator=g) * 1.5 + mean               # a shared mean direction, as real keys
    v = torch.randn(2, 3, 256, 64, generator=g)
    q = torch.randn(2, 9, 16, 64, generator=g) + 0.5 * mean
    return k, v, q


def test_ada_tiers_distortion_increases_for_lower_tiers():
    ts, stats = calibrate(TierSet.default(), *_samples(), return_stats=True)
    d = ts.distortion
    assert len(d) == 3 and d[0] == 0.0
    assert 0.0 < d[1] < d[2]
    assert [s.name for s in stats] == ["dense", "sphkv-4", "sphkv-2"]
    assert 0 < stats[1].logit_rmse < stats[2].logit_rmse
    assert 0 < stats[1].output_rel_err < stats[2].output_rel_err
    assert stats[0].bytes_per_token > stats[1].bytes_per_token > stats[2].bytes_per_token


def test_grid_tiers_distortion_increases_and_int8_is_nearly_free():
    ts = calibrate(grid_tierset(), *_samples(1))
    d = ts.distortion
    assert d[0] == 0.0 and 0.0 < d[1] < d[2] < d[3]
    assert d[1] < 0.05


def test_distortion_is_in_drop_units():
    from sphkv.retention.calibration import _measure_one

    k, v, q = (x[0] for x in _samples(2))
    q1 = q[:, -1:]                                                          # one query per head: one output o
    pos = torch.tensor([255])
    scale = 64 ** -0.5
    o = torch.softmax((q1.reshape(3, 3, 64) @ k.transpose(-1, -2)) * scale, -1) @ v       # [3, 3, 64]
    # a "tier" that replaces every value of a group by that group's attention output costs what dropping costs
    for h in range(3):
        vh = o[h, 0].expand(256, 64)[None]
        pert, ref = _measure_one(q1[3 * h:3 * h + 1], k[h:h + 1], v[h:h + 1], k[h:h + 1], vh, scale, pos)[:2]
        assert pert / ref == pytest.approx(1.0, rel=1e-4)
    # a key error that shifts all logits of a query equally costs nothing (softmax ignores it)
    shifted = k + torch.randn(64)
    pert, ref = _measure_one(q, k, v, shifted, v, scale, torch.arange(240, 256))[:2]
    assert pert / ref < 1e-3
    assert calibrate(eviction_tierset(), k, v, q).distortion == (0.0,)


def test_monotone_running_max_and_shape_errors():
    k, v, q = _samples(3)
    base = TierSet.default()
    swapped = TierSet((base.tiers[0], base.tiers[2], base.tiers[1]))          # coarse tier listed first
    ts, stats = calibrate(swapped, k, v, q, return_stats=True)
    assert stats[2].distortion < stats[1].distortion                         # raw values keep the inversion
    assert ts.distortion == (0.0, stats[1].distortion, stats[1].distortion)  # running max
    raw = calibrate(swapped, k, v, q, monotone=False)
    assert raw.distortion[2] == stats[2].distortion
    with pytest.raises(ValueError, match="incompatible"):
        calibrate(TierSet.default(), k, v[..., :100, :], q)
    with pytest.raises(ValueError, match="sample_k"):
        calibrate(TierSet.default(), k[0, 0, 0], v, q)
