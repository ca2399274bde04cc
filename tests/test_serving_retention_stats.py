# SPDX-License-Identifier: Apache-2.0
"""The bound-budget serving run's paired comparison (benchmarks/serving/retention.py): no server needed."""
import pytest

from benchmarks.serving.retention import paired_delta


def test_paired_delta_is_the_token_weighted_mean_difference_with_a_conversation_bootstrap():
    a = [[-1.0, -2.0, -3.0], [-0.5], [-2.0, -2.0]]
    b = [[-1.5, -2.0, -2.0], [-1.0], [-2.5, -1.5]]
    d = paired_delta(a, b, resamples=500)
    diffs = [0.5, 0.0, -1.0, 0.5, 0.5, -0.5]
    assert d["mean"] == pytest.approx(sum(diffs) / len(diffs))
    assert (d["tokens"], d["conversations"]) == (6, 3)
    assert d["per_conv"] == pytest.approx([-0.5 / 3, 0.5, 0.0])
    lo, hi = d["ci95"]
    assert min(d["per_conv"]) <= lo <= d["mean"] <= hi <= max(d["per_conv"])


def test_paired_delta_of_identical_runs_is_exactly_zero():
    a = [[-1.25, -0.5], [-3.0]]
    d = paired_delta(a, [list(x) for x in a])
    assert d["mean"] == 0.0 and d["ci95"] == [0.0, 0.0]


def test_paired_delta_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="same conversations and continuation tokens"):
        paired_delta([[-1.0, -2.0]], [[-1.0]])
