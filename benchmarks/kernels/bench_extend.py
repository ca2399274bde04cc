# SPDX-License-Identifier: Apache-2.0
"""Extend (chunked prefill) on the GPU: new dense tokens over a coded prefix vs FlashInfer's paged prefill.

Llama-3.1-8B attention shapes (32 query / 8 kv heads, head_dim 128, page 64). Each request has ``--prefix`` cached
tokens and ``--new`` new tokens (defaults 32K and 4K, batch 1 and 8):

- **ADA**: the prefix is all ``sphkv-4`` pages. Its part is :class:`BatchPrefillWithSphKVPagedKVCacheWrapper` with
  the Triton backend (today: one decode row per (new token, kv head) through the decode kernels, no extend kernel),
  the new tokens among themselves are FlashInfer's ragged causal prefill (bf16), and the two states are merged by
  log-sum-exp (``merge_state``). ``ada_prefix_us``, ``fi_new_causal_us``, ``merge_us`` and ``ada_total_us`` (all three
  in one CUDA graph) are reported.
- **FlashInfer**: ``BatchPrefillWithPagedKVCacheWrapper`` over bf16 (and fp8_e4m3) pages holding prefix + new tokens,
  ``causal=True`` (the new tokens' rows of the mask are bottom-right aligned, i.e. extend semantics).

Before timing, the ADA path is checked against :func:`sphkv_kernels.extend.extend_attention_reference` at a small
shape (``check_max_abs_diff``). A FlashInfer failure is written into the row, never a crash. Median device time
(``triton.testing.do_bench``, L2 flushed, CUDA graph when it captures). Writes ``--out`` (JSON, key ``rows``).

Usage (GPU; FlashInfer carried as in ``gpu_run.sh``)::

    python benchmarks/kernels/bench_extend.py --batches 1 8 --prefix 32768 --new 4096 --out /tmp/decode_extend.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.kernels.bench_decode import _time_us, coded_tier  # noqa: E402
from flashinfer_ext import BatchPrefillWithSphKVPagedKVCacheWrapper  # noqa: E402
from sphkv.attention import merge_state  # noqa: E402
from sphkv.pool import TierPool  # noqa: E402
from sphkv_kernels.testing import fill_random  # noqa: E402

HQ, HKV, D, P = 32, 8, 128, 64
# FlashInfer's FA2 prefill kernels: its "auto" picks the FA3 (sm90) ones on Hopper, whose JIT build needs the CUTLASS
# headers the carried FlashInfer tree leaves out (H200 run 8: ninja failed); FA2 is what the tensor-core decode uses
FI_BACKEND = "fa2"


def ada_prefix(batch: int, prefix: int, new: int, preset: str):
    """A coded pool holding every request's prefix (all kv heads) and a planned prefill wrapper."""
    tier = coded_tier(preset, P, D)
    rows, ppr = batch * HKV, prefix // P
    pool = TierPool(tier, rows * ppr + 1, head_dim=D, page_size=P, device="cuda")
    fill_random(pool)
    w = BatchPrefillWithSphKVPagedKVCacheWrapper(tiers=[tier], backend="triton",
                                                 workspace_buffer=torch.empty(256 << 20, dtype=torch.uint8,
                                                                              device="cuda"))
    t0 = time.perf_counter()
    w.plan(torch.arange(batch + 1, dtype=torch.int32, device="cuda") * new,
           torch.arange(rows + 1, dtype=torch.int32, device="cuda") * ppr,
           torch.arange(1, rows * ppr + 1, dtype=torch.int32, device="cuda"),
           torch.zeros(rows * ppr, dtype=torch.int32, device="cuda"),
           torch.full((rows,), P, dtype=torch.int32, device="cuda"), HQ, HKV, D, P)
    torch.cuda.synchronize()
    return w, pool, time.perf_counter() - t0


def fi_ragged_new(batch: int, new: int):
    """FlashInfer's causal ragged prefill of the new tokens over themselves; returns ``run(q, k, v) -> (o, lse_ln)``."""
    import flashinfer
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"), "NHD",
                                                        backend=FI_BACKEND)
    ind = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * new
    w.plan(ind, ind, HQ, HKV, D, causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)

    def run(q, k, v):
        o, lse = w.run(q, k, v, return_lse=True)
        return o, lse * 0.6931471805599453                      # FlashInfer's lse is base 2; merge_state takes ln
    return run


def check_small(preset: str) -> float:
    """ADA extend (coded prefix + new tokens, merged) vs the pure-PyTorch extend reference at a small shape."""
    from sphkv_kernels.extend import extend_attention_reference

    batch, prefix, new = 2, 256, 48
    w, pool, _ = ada_prefix(batch, prefix, new, preset)
    q = torch.randn(batch * new, HQ, D, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch * new, HKV, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    o_p, l_p = w.run(q, [pool], return_lse=True)
    o_n, l_n = fi_ragged_new(batch, new)(q, k, v)
    out, _ = merge_state(o_p, l_p, o_n.float(), l_n.float())
    rows, ppr = batch * HKV, prefix // P
    ref = extend_attention_reference(q.float(), k.float(), v.float(), torch.arange(batch + 1) * new, [pool],
                                     torch.arange(rows + 1) * ppr, torch.arange(1, rows * ppr + 1),
                                     torch.zeros(rows * ppr, dtype=torch.int32), torch.full((rows * ppr,), P),
                                     num_kv_heads=HKV)
    return float((out - ref.to(out.device)).abs().max())


def fi_paged(batch: int, prefix: int, new: int, kv: str, q):
    """Median µs of FlashInfer's causal paged prefill of ``new`` tokens over ``prefix + new`` cached tokens."""
    try:
        import flashinfer
        total = prefix + new
        ppr = -(-total // P)
        kv_dtype = torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn
        kc = torch.empty(batch * ppr, P, HKV, D, dtype=torch.bfloat16, device="cuda").normal_().to(kv_dtype)
        vc = torch.empty_like(kc, dtype=torch.bfloat16).normal_().to(kv_dtype)
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"),
                                                           "NHD", backend=FI_BACKEND)
        last = total - (ppr - 1) * P
        w.plan(torch.arange(batch + 1, dtype=torch.int32, device="cuda") * new,
               torch.arange(batch + 1, dtype=torch.int32, device="cuda") * ppr,
               torch.arange(batch * ppr, dtype=torch.int32, device="cuda"),
               torch.full((batch,), last, dtype=torch.int32, device="cuda"), HQ, HKV, D, P, causal=True,
               q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
        out = torch.empty_like(q)
        us, _ = _time_us(lambda: w.run(q, (kc, vc), out=out), rep_ms=200)
        return round(us, 1), None
    except Exception as exc:  # noqa: BLE001 - a JIT/plan/run failure is written into the row
        return None, f"{kv}: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        torch.cuda.empty_cache()


def measure(batch: int, prefix: int, new: int, preset: str, fp8: bool) -> dict:
    row = dict(batch=batch, prefix=prefix, new=new, num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=P,
               preset=preset)
    q = torch.randn(batch * new, HQ, D, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch * new, HKV, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    try:
        w, pool, plan_s = ada_prefix(batch, prefix, new, preset)
        row["ada_plan_ms"] = round(plan_s * 1e3, 1)
        row["ada_prefix_us"] = round(_time_us(lambda: w.run(q, [pool], return_lse=True), rep_ms=200)[0], 1)
        try:
            new_run = fi_ragged_new(batch, new)
            row["fi_new_causal_us"] = round(_time_us(lambda: new_run(q, k, v), rep_ms=200)[0], 1)
            o_p, l_p = w.run(q, [pool], return_lse=True)
            o_n, l_n = new_run(q, k, v)
            o_n, l_n = o_n.float(), l_n.float()
            row["merge_us"] = round(_time_us(lambda: merge_state(o_p, l_p, o_n, l_n), rep_ms=100)[0], 1)

            def total():
                a, la = w.run(q, [pool], return_lse=True)
                b, lb = new_run(q, k, v)
                return merge_state(a, la, b.float(), lb.float())
            row["ada_total_us"] = round(_time_us(total, rep_ms=200)[0], 1)
        except Exception as exc:  # noqa: BLE001
            row["ada_note"] = f"new-token part: {type(exc).__name__}: {str(exc)[:200]}"
        del w, pool
    except Exception as exc:  # noqa: BLE001
        row["ada_note"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    torch.cuda.empty_cache()
    notes = []
    for key, kv in (("fi_bf16_us", "bf16"), ("fi_fp8_us", "fp8_e4m3")) if fp8 else (("fi_bf16_us", "bf16"),):
        row[key], why = fi_paged(batch, prefix, new, kv, q)
        if why:
            notes.append(why)
    if notes:
        row["flashinfer_note"] = "; ".join(notes)
    ada = row.get("ada_total_us")
    for key, base in (("speedup_vs_fi_bf16", "fi_bf16_us"), ("speedup_vs_fi_fp8", "fi_fp8_us")):
        row[key] = round(row[base] / ada, 4) if ada and row.get(base) else None
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prefix", type=int, default=32768)
    ap.add_argument("--new", type=int, default=4096)
    ap.add_argument("--preset", default="sphkv-4")
    ap.add_argument("--no-fp8", dest="fp8", action="store_false")
    ap.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results" / "decode_extend.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_extend needs CUDA")
    if args.prefix % P or args.prefix <= 0 or args.new <= 0:
        raise SystemExit(f"--prefix={args.prefix} must be a positive multiple of the page size {P}; --new={args.new} > 0")
    import triton
    t0 = time.time()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=[])
    try:
        res["check_max_abs_diff"] = check_small(args.preset)
        print(f"check vs extend_attention_reference (batch 2, 256 + 48): max |diff| {res['check_max_abs_diff']:.2e}")
    except Exception as exc:  # noqa: BLE001
        res["check_note"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(f"check failed: {res['check_note']}")
    print(f"{'batch':>5} {'prefix':>7} {'new':>5} | {'ADA prefix':>10} {'FI new':>8} {'merge':>7} {'ADA total':>10} | "
          f"{'FI bf16':>9} {'FI fp8':>9} | {'x bf16':>7}  (µs)")
    for b in args.batches:
        row = measure(b, args.prefix, args.new, args.preset, args.fp8)
        res["rows"].append(row)
        f = lambda k: f"{row[k]:>{10 if 'total' in k or 'prefix' in k else 8}}" if row.get(k) is not None else "n/a"  # noqa: E731
        print(f"{b:>5} {args.prefix:>7} {args.new:>5} | {f('ada_prefix_us')} {f('fi_new_causal_us')} {f('merge_us')} "
              f"{f('ada_total_us')} | {f('fi_bf16_us')} {f('fi_fp8_us')} | {row.get('speedup_vs_fi_bf16')}  "
              f"{row.get('ada_note', '')} {row.get('flashinfer_note', '')}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    res["seconds"] = round(time.time() - t0, 1)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out} in {res['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
