# SPDX-License-Identifier: Apache-2.0
"""Needle margins and the <= 4.5-bit successor candidates of the quality harness (issue 12), without a model:
the committed margins agree with the committed hits, and ``Ada(angle_bits=)`` derives its levels from head_dim."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.quality.ada import Ada
from benchmarks.quality.methods import PrefillContext
from sphkv.codebooks import optimal_level_bits

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_committed_margins_agree_with_hits():
    """A single-needle case is a hit exactly when its smallest answer-token margin is > 0 (the harness's rule)."""
    rows = [r for r in json.loads((RESULTS / "quality-quick.json").read_text()) if "answer_margin_per_depth" in r]
    assert {r["model"] for r in rows} >= {"gemma3"}
    for r in rows:
        assert [m > 0 for m in r["answer_margin_per_depth"]] == r["needle_hits"], (r["model"], r["corpus"], r["method"])
    files = sorted(RESULTS.glob("quality-quick-needles-*.json"))
    assert files
    quick = {(r["model"], r["corpus"], r["context"], r["method"]): r for r in json.loads((RESULTS / "quality-quick.json").read_text())}
    for f in files:
        d = json.loads(f.read_text())
        for name, m in d["methods"].items():
            hits = [min(c["margins"]) > 0 for c in m["cases"]]
            assert len(hits) == 8 and [c["depth"] for c in m["cases"]] == sorted(c["depth"] for c in m["cases"])
            row = quick.get((d["model"], d["corpus"], d["context"], name))
            if row is not None:                      # the same method in the harness run: the same hits
                assert hits == row["needle_hits"], (f.name, name)


@pytest.mark.parametrize("head_dim", [64, 256])
def test_angle_bits_candidates_derive_levels_from_head_dim(head_dim):
    ada = Ada("sphkv-4b", sink=4, angle_bits=4.75, overrides={"value_bits": 3})
    cfg = ada.config(head_dim)
    assert cfg.level_bits == optimal_level_bits(head_dim, 4.75) and len(cfg.level_bits) == head_dim.bit_length() - 1
    assert cfg.angle_bits == 4.75 * head_dim and cfg.value_bits == 3          # 4.75 angle bits per coordinate
    g = torch.Generator().manual_seed(0)
    kv = [torch.randn(1, 1, 300, head_dim, generator=g).to(torch.bfloat16) for _ in range(2)]
    ctx = PrefillContext([kv[0]], [kv[1]], [None], None)
    bits = {n: Ada("sphkv-4b", sink=4, angle_bits=a, overrides=o).build(ctx).bits_per_element
            for n, a, o in (("4b", None, {}), ("a4.5", 4.5, {}), ("a4.75", 4.75, {}), ("v4", 3.75, {"value_bits": 4}))}
    assert bits["4b"] < bits["a4.5"] < bits["a4.75"] <= 4.5 + 0.25       # more angle bits cost more
    assert bits["a4.75"] - bits["a4.5"] == pytest.approx(0.25 / 2, abs=0.02)   # +0.25 bit on keys = +0.125 / element
