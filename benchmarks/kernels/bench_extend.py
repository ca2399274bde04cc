# SPDX-License-Identifier: Apache-2.0
"""Extend (chunked prefill) on the GPU: new dense tokens over a coded prefix vs FlashInfer's paged prefill.

Llama-3.1-8B attention shapes (32 query / 8 kv heads, head_dim 128, page 64). Each request has ``--prefix`` cached
tokens and ``--new`` new tokens (defaults 32K and 4K, batch 1 and 8):

- **ADA**: the prefix is all ``sphkv-4`` pages. Its part is :class:`BatchPrefillWithSphKVPagedKVCacheWrapper` with
  the Triton backend, the new tokens among themselves are FlashInfer's ragged causal prefill (bf16), and the two
  states are merged by log-sum-exp (``merge_state``). Two routes of the prefix part (``kernel_options["extend"]``):
  ``"rows"`` (one decode row per (new token, kv head) through the decode kernels) — ``ada_prefix_us``,
  ``fi_new_causal_us``, ``merge_us`` and ``ada_total_us`` (all three in one CUDA graph); ``"tiles"``
  (:mod:`sphkv_kernels.extend_tiles`: each key tile expanded once per block of new tokens, tensor-core dots) —
  ``ours_tiles_prefix_ms``, ``ours_tiles_ms`` (prefix + new + merge, one graph), ``tiles_plan_ms``,
  ``speedup_tiles_vs_fi_bf16``; ``--tiles-options`` passes its ``kernel_options`` (JSON, e.g. ``{"block_m": 128}``).
- **FlashInfer**: ``BatchPrefillWithPagedKVCacheWrapper`` over bf16 (and fp8_e4m3) pages holding prefix + new tokens,
  ``causal=True`` (the new tokens' rows of the mask are bottom-right aligned, i.e. extend semantics).

Before timing, both routes are checked against :func:`sphkv_kernels.extend.extend_attention_reference` at a small
shape (``check_max_abs_diff``, ``check_tiles_max_abs_diff``). A FlashInfer or route failure is written into the row,
never a crash. Median device time (``triton.testing.do_bench``, L2 flushed, CUDA graph when it captures). Writes
``--out`` (JSON, key ``rows``). ``--no-rows`` skips the rows route (≈ 1 s per batch-8 call on the H200).

``--smoke`` (CPU, ``TRITON_INTERPRET=1``): both routes at a tiny shape vs the reference (the new tokens' causal part
in torch), ``extend_smoke.json`` in ``--out-dir``.

Usage (GPU; FlashInfer carried as in ``gpu_run.sh``)::

    python benchmarks/kernels/bench_extend.py --batches 1 8 --prefix 32768 --new 4096 --out /tmp/decode_extend.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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


def ada_prefix(batch: int, prefix: int, new: int, preset: str, route: str = "rows", options=None,
               shape=(HQ, HKV, D, P), device="cuda", pool=None):
    """A coded pool holding every request's prefix (all kv heads; ``pool`` reuses one) and a prefill wrapper planned
    on ``route`` (``kernel_options["extend"]``: ``"rows"`` or ``"tiles"``, plus ``options``)."""
    hq, hkv, d, p = shape
    tier = coded_tier(preset, p, d)
    rows, ppr = batch * hkv, prefix // p
    if pool is None:
        pool = TierPool(tier, rows * ppr + 1, head_dim=d, page_size=p, device=device)
        fill_random(pool)
    ws = torch.empty(256 << 20 if device == "cuda" else 1 << 20, dtype=torch.uint8, device=device)
    w = BatchPrefillWithSphKVPagedKVCacheWrapper(tiers=[tier], backend="triton", workspace_buffer=ws)
    t0 = time.perf_counter()
    w.plan(torch.arange(batch + 1, dtype=torch.int32, device=device) * new,
           torch.arange(rows + 1, dtype=torch.int32, device=device) * ppr,
           torch.arange(1, rows * ppr + 1, dtype=torch.int32, device=device),
           torch.zeros(rows * ppr, dtype=torch.int32, device=device),
           torch.full((rows,), p, dtype=torch.int32, device=device), hq, hkv, d, p,
           kernel_options=dict(options or {}, extend=route))
    if device == "cuda":
        torch.cuda.synchronize()
    return w, pool, time.perf_counter() - t0


def torch_causal_new(q, k, v, batch: int, new: int):
    """The new tokens among themselves (causal) in torch, float32: ``(o [n, Hq, d], lse_ln [n, Hq])`` (the smoke
    check's stand-in for FlashInfer's ragged prefill)."""
    n, hq, d = q.shape
    g = hq // k.shape[1]
    qq = q.float().view(batch, new, hq, d).transpose(1, 2)                                  # [B, Hq, m, d]
    kk = k.float().repeat_interleave(g, 1).view(batch, new, hq, d).transpose(1, 2)
    vv = v.float().repeat_interleave(g, 1).view(batch, new, hq, d).transpose(1, 2)
    s = (qq @ kk.transpose(-1, -2)) * d ** -0.5
    s = s.masked_fill(torch.ones(new, new, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    o = (torch.softmax(s, -1) @ vv).transpose(1, 2).reshape(n, hq, d)
    return o, torch.logsumexp(s, -1).transpose(1, 2).reshape(n, hq)


def check_routes(preset: str, routes=("rows", "tiles"), *, batch=2, prefix=256, new=48, shape=(HQ, HKV, D, P),
                 device="cuda", new_part=None, options=None) -> dict:
    """Each route's prefix part merged with the new tokens' causal part (``new_part(q, k, v)``, default FlashInfer's
    ragged prefill) vs the pure-PyTorch extend reference: max |diff| per route."""
    from sphkv_kernels.extend import extend_attention_reference

    hq, hkv, d, p = shape
    q = torch.randn(batch * new, hq, d, device=device).to(torch.bfloat16 if device == "cuda" else torch.float16)
    k = torch.randn(batch * new, hkv, d, device=device).to(q.dtype)
    v = torch.randn_like(k)
    o_n, l_n = (new_part or fi_ragged_new(batch, new))(q, k, v)
    res, pool = {}, None
    for route in routes:
        w, pool, _ = ada_prefix(batch, prefix, new, preset, route, options if route == "tiles" else None, shape,
                                device, pool)
        o_p, l_p = w.run(q, [pool], return_lse=True)
        out, _ = merge_state(o_p, l_p, o_n.float(), l_n.float())
        rows, ppr = batch * hkv, prefix // p
        ref = extend_attention_reference(q.float(), k.float(), v.float(), torch.arange(batch + 1) * new, [pool],
                                         torch.arange(rows + 1) * ppr, torch.arange(1, rows * ppr + 1),
                                         torch.zeros(rows * ppr, dtype=torch.int32), torch.full((rows * ppr,), p),
                                         num_kv_heads=hkv)
        res[route] = float((out - ref.to(out.device)).abs().max())
    return res


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


def measure_tiles(row: dict, batch: int, prefix: int, new: int, preset: str, options, q, k, v) -> None:
    """The tiles route: ``tiles_plan_ms``, ``ours_tiles_prefix_ms``, ``ours_tiles_ms`` (prefix + FlashInfer's ragged
    causal part + merge, one graph) into ``row``; a failure goes into ``tiles_note``."""
    try:
        w, pool, plan_s = ada_prefix(batch, prefix, new, preset, "tiles", options)
        row["tiles_plan_ms"] = round(plan_s * 1e3, 1)
        row["tiles_pages_per_split"] = w._plan["pages_per_split"]
        row["ours_tiles_prefix_ms"] = round(_time_us(lambda: w.run(q, [pool], return_lse=True), rep_ms=200)[0] / 1e3, 3)
        new_run = fi_ragged_new(batch, new)

        def total():
            a, la = w.run(q, [pool], return_lse=True)
            b, lb = new_run(q, k, v)
            return merge_state(a, la, b.float(), lb.float())
        row["ours_tiles_ms"] = round(_time_us(total, rep_ms=200)[0] / 1e3, 3)
        del w, pool
    except Exception as exc:  # noqa: BLE001 - written into the row
        row["tiles_note"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    torch.cuda.empty_cache()


def measure(batch: int, prefix: int, new: int, preset: str, fp8: bool, rows_route: bool = True,
            tiles_options=None) -> dict:
    row = dict(batch=batch, prefix=prefix, new=new, num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=P,
               preset=preset)
    q = torch.randn(batch * new, HQ, D, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch * new, HKV, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    measure_tiles(row, batch, prefix, new, preset, tiles_options, q, k, v)
    try:
        if not rows_route:
            raise RuntimeError("rows route skipped (--no-rows)")
        w, pool, plan_s = ada_prefix(batch, prefix, new, preset, "rows")
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
    tiles = row.get("ours_tiles_ms")
    for key, base in (("speedup_tiles_vs_fi_bf16", "fi_bf16_us"), ("speedup_tiles_vs_fi_fp8", "fi_fp8_us")):
        row[key] = round(row[base] / 1e3 / tiles, 4) if tiles and row.get(base) else None
    return row


def sweep_tiles(variants, batch: int, prefix: int, new: int, preset: str) -> list:
    """Each tiles ``kernel_options`` variant: checked against the extend reference at the small shape
    (``check_max_abs_diff``), then its prefix part timed at ``batch`` (``prefix_ms``, one CUDA graph). A failure is
    written into the variant's ``note``."""
    q = torch.randn(batch * new, HQ, D, dtype=torch.bfloat16, device="cuda")
    out, pool = [], None
    for opts in variants:
        r = dict(options=opts, batch=batch, prefix=prefix, new=new)
        try:
            r["check_max_abs_diff"] = check_routes(preset, ("tiles",), options=opts)["tiles"]
            w, pool, plan_s = ada_prefix(batch, prefix, new, preset, "tiles", opts, pool=pool)
            r["plan_ms"] = round(plan_s * 1e3, 1)
            r["pages_per_split"] = w._plan["pages_per_split"]
            r["prefix_ms"] = round(_time_us(lambda: w.run(q, [pool], return_lse=True), rep_ms=200)[0] / 1e3, 3)
            del w
        except Exception as exc:  # noqa: BLE001 - written into the variant
            r["note"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(f"  tiles {json.dumps(opts)}: prefix {r.get('prefix_ms')} ms, check {r.get('check_max_abs_diff')} "
              f"{r.get('note', '')}", flush=True)
        out.append(r)
        torch.cuda.empty_cache()
    return out


def smoke(out_dir: Path) -> dict:
    """CPU, Triton interpreter: both routes at a tiny shape (GQA 4, head_dim 64, page 16; 2 requests x (32 + 3))
    against the pure-PyTorch extend reference."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--smoke needs TRITON_INTERPRET=1 set before Python starts (CPU interpreter)")
    t0 = time.perf_counter()
    res = check_routes("sphkv-4", batch=2, prefix=32, new=3, shape=(4, 1, 64, 16), device="cpu",
                       new_part=lambda q, k, v: torch_causal_new(q, k, v, 2, 3), options={"block_m": 16})
    res = {f"{r}_max_abs_diff": e for r, e in res.items()}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    bad = {k: e for k, e in res.items() if k.endswith("diff") and not e < 2e-3}
    if bad:
        raise SystemExit(f"smoke: routes disagree with extend_attention_reference: {bad}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "extend_smoke.json").write_text(json.dumps(res, indent=1))
    print(f"smoke ok: {res} -> {out_dir / 'extend_smoke.json'}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prefix", type=int, default=32768)
    ap.add_argument("--new", type=int, default=4096)
    ap.add_argument("--preset", default="sphkv-4")
    ap.add_argument("--no-fp8", dest="fp8", action="store_false")
    ap.add_argument("--no-rows", dest="rows", action="store_false", help="skip the rows route (slow)")
    ap.add_argument("--tiles-options", type=json.loads, default={},
                    help='kernel_options of the tiles route, JSON (e.g. \'{"block_m": 128, "num_warps": 8}\')')
    ap.add_argument("--tiles-sweep", type=json.loads, default=None,
                    help="JSON list of tiles kernel_options: each checked and its prefix part timed at the first "
                         "--batches value (key tiles_sweep); the other columns are not timed")
    ap.add_argument("--check-only", action="store_true",
                    help="only the routes' checks against the reference (compiles their kernels, no timing)")
    ap.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results" / "decode_extend.json")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1 (CI)")
    ap.add_argument("--out-dir", type=Path, default=None, help="--smoke's output folder (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke(args.out_dir or Path(tempfile.mkdtemp(prefix="sphkv-bench-")))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench_extend needs CUDA (use --smoke on CPU)")
    if args.prefix % P or args.prefix <= 0 or args.new <= 0:
        raise SystemExit(f"--prefix={args.prefix} must be a positive multiple of the page size {P}; --new={args.new} > 0")
    import triton
    t0 = time.time()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=[])
    for route in ("rows", "tiles"):
        key = "check_max_abs_diff" if route == "rows" else "check_tiles_max_abs_diff"
        try:
            res[key] = check_routes(args.preset, (route,), options=args.tiles_options)[route]
            print(f"check {route} vs extend_attention_reference (batch 2, 256 + 48): max |diff| {res[key]:.2e}")
        except Exception as exc:  # noqa: BLE001
            res[key.replace("max_abs_diff", "note")] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"check {route} failed: {type(exc).__name__}: {str(exc)[:300]}")
    if args.check_only:
        return 0
    if args.tiles_sweep is not None:
        res["tiles_sweep"] = sweep_tiles(args.tiles_sweep, args.batches[0], args.prefix, args.new, args.preset)
        res["seconds"] = round(time.time() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out} in {res['seconds']} s")
        return 0
    print(f"{'batch':>5} {'prefix':>7} {'new':>5} | {'ADA prefix':>10} {'FI new':>8} {'merge':>7} {'ADA total':>10} | "
          f"{'FI bf16':>9} {'FI fp8':>9} | {'x bf16':>7} | {'tiles ms':>9} {'x bf16':>7}  (µs unless ms)")
    for b in args.batches:
        row = measure(b, args.prefix, args.new, args.preset, args.fp8, args.rows, args.tiles_options)
        res["rows"].append(row)
        f = lambda k: f"{row[k]:>{10 if 'total' in k or 'prefix' in k else 8}}" if row.get(k) is not None else "n/a"  # noqa: E731
        print(f"{b:>5} {args.prefix:>7} {args.new:>5} | {f('ada_prefix_us')} {f('fi_new_causal_us')} {f('merge_us')} "
              f"{f('ada_total_us')} | {f('fi_bf16_us')} {f('fi_fp8_us')} | {row.get('speedup_vs_fi_bf16')} | "
              f"{f('ours_tiles_ms')} {row.get('speedup_tiles_vs_fi_bf16')}  "
              f"{row.get('ada_note', '')} {row.get('tiles_note', '')} {row.get('flashinfer_note', '')}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    res["seconds"] = round(time.time() - t0, 1)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out} in {res['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
