# SPDX-License-Identifier: Apache-2.0
"""Planning cost of Rate-Distortion Retention per 1K tokens (CPU, SmolLM2-135M shapes).

For each context length and budget: observation-window utility (W queries), allocation (λ
bisection + page rounding + greedy fix-up on exact bytes) and writing the pages (encoding) are
timed separately; the median of ``--repeats`` runs is reported per 1K tokens. Keys and values are
synthetic with a shared mean direction (planning cost does not depend on their content much).
Writes ``benchmarks/results/planning.json``.

Usage: ``python -m benchmarks.quality.bench_planning [--lengths 1024 2048 4096] [--quick]``
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sphkv.pages import PagedStore
from sphkv.retention import (TierCosts, ada_tierset, allocate, budget_from_fraction, calibrate, layer_utility,
                             make_policy, protected_mask)

LAYERS, HKV, HQ, D = 30, 3, 9, 64
RESULTS = Path(__file__).resolve().parents[1] / "results" / "planning.json"


def synthetic(n: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(D, generator=g) * 2
    keys = [torch.randn(1, HKV, n, D, generator=g) * 1.5 + mean for _ in range(LAYERS)]
    values = [torch.randn(1, HKV, n, D, generator=g) for _ in range(LAYERS)]
    queries = [torch.randn(1, HQ, w, D, generator=g) + 0.3 * mean for _ in range(LAYERS)]
    return keys, values, queries


def _median_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench(lengths, fractions, repeats: int, window: int, page_size: int) -> dict:
    ts = ada_tierset(head_dim=D, page_size=page_size)
    keys, values, queries = synthetic(1024, window)
    t = time.perf_counter()
    ts = calibrate(ts, torch.stack([k[0] for k in keys[::10]]), torch.stack([v[0] for v in values[::10]]),
                   torch.stack([q[0] for q in queries[::10]]))
    calib_s = time.perf_counter() - t
    costs = TierCosts.from_tierset(ts)
    policy = make_policy("snapkv")
    rows = []
    for n in lengths:
        keys, values, queries = synthetic(n, window)
        util_s, utility = _median_time(lambda: layer_utility(policy, keys, queries), repeats)
        prot = protected_mask(n, sinks=4, recent=32)
        for f in fractions:
            budget = budget_from_fraction(f, n, LAYERS, HKV, D)
            try:
                alloc_s, plan = _median_time(lambda: allocate(utility, costs, budget, protected=prot), repeats)
            except ValueError as e:                                   # budget below the protected minimum
                rows.append(dict(tokens=n, budget_fraction=f, skipped=str(e)))
                continue

            def write():
                store = PagedStore(ts, plan.pages.sum((0, 1)).tolist(), num_layers=LAYERS, num_kv_heads=HKV)
                for layer in range(LAYERS):
                    store.write_plan(layer, keys[layer], values[layer], plan.tiers[layer])
                return store

            store_s, store = _median_time(write, 1)
            b = store.bytes()
            k1 = n / 1000
            rows.append(dict(tokens=n, budget_fraction=f, utility_ms_per_1k=1e3 * util_s / k1,
                             allocate_ms_per_1k=1e3 * alloc_s / k1, plan_ms_per_1k=1e3 * (util_s + alloc_s) / k1,
                             store_ms_per_1k=1e3 * store_s / k1, stored_bytes=b.stored_bytes, budget_bytes=budget,
                             metadata_overhead=b.metadata_overhead, position_index_overhead=b.position_overhead,
                             tokens_per_tier=plan.summary()["tokens_per_tier"], dropped=plan.summary()["dropped"]))
    return dict(model_shape=dict(layers=LAYERS, kv_heads=HKV, q_heads=HQ, head_dim=D), window=window,
                page_size=page_size, repeats=repeats, tiers=list(costs.names), distortion=list(costs.distortion),
                calibrate_s=calib_s, torch_threads=torch.get_num_threads(), machine=platform.processor() or
                platform.machine(), rows=rows)


def table(result: dict) -> str:
    head = (f"{'tokens':>7} {'budget':>6} {'utility':>9} {'allocate':>9} {'plan':>9} {'store':>9} "
            f"{'meta%':>6} {'pos%':>6}")
    lines = [f"planning time per 1K tokens (ms), {result['model_shape']['layers']} layers x "
             f"{result['model_shape']['kv_heads']} kv heads, page {result['page_size']}", head]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"{r['tokens']:>7} {r['budget_fraction']:>6.2f}  skipped: below the protected minimum")
            continue
        lines.append(f"{r['tokens']:>7} {r['budget_fraction']:>6.2f} {r['utility_ms_per_1k']:>9.2f} "
                     f"{r['allocate_ms_per_1k']:>9.2f} {r['plan_ms_per_1k']:>9.2f} {r['store_ms_per_1k']:>9.1f} "
                     f"{100 * r['metadata_overhead']:>6.3f} {100 * r['position_index_overhead']:>6.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="lengths 1024 2048, one repeat")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = [1024, 2048], 1
    result = bench(args.lengths, args.fractions, args.repeats, args.window, args.page_size)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
