# SPDX-License-Identifier: Apache-2.0
"""Decode attention speed: ADA (Spherical KV) vs what SGLang users run (FlashInfer) vs a Triton bf16 paged kernel vs SDPA.

Baselines in the same run: FlashInfer's paged decode with bf16 KV on CUDA cores (``fi_bf16_us``) and on tensor cores
(``fi_bf16_tc_us``, ``use_tensor_cores=True``: what SGLang's FlashInfer backend runs for GQA >= 4), fp8_e4m3 KV on
tensor cores (``fi_fp8_tc_us``: ``--kv-cache-dtype fp8_e4m3``), our Triton bf16 kernel, SDPA and the device-to-device
copy bandwidth. A FlashInfer import/JIT/plan/run failure is written into the row (``flashinfer_note``), never a crash.
Shapes: Llama-3.1-8B attention (32 query heads, 8 kv heads, head_dim 128) at batch {1, 8, 32, 64} × context
{8K, 32K, 128K} where memory allows, plus 64/8/128 (GQA 8) and head_dim 64 and 256 at 8 × 32K (``--shapes`` picks
explicit ones). Every method is timed as the median of many runs with CUDA events (``triton.testing.do_bench``, L2
flushed), on a CUDA graph of the call when it captures. Writes ``<out-dir>/decode.json`` (key ``rows``: device,
batch, context, num_qo_heads, num_kv_heads, head_dim, preset, bits_per_element, ada_us, fi_bf16_us, fi_bf16_tc_us,
fi_fp8_tc_us, speedup_vs_bf16_tc, speedup_vs_fp8_tc, gb_s, copy_gb_s, ...), ``decode.md`` and, after every row,
``decode.partial.json``; prints a table. ``--tune`` first times coded-kernel launch variants at 8 × 32K.

``--smoke`` runs a tiny shape on the CPU under Triton's interpreter (for CI): it checks that every
path runs and agrees, and writes ``decode_smoke.json`` to ``--out-dir`` (default: a temp dir).

Usage::

    bash benchmarks/kernels/gpu_run.sh check decode               # on the GPU machine, FlashInfer in .fi/
    python benchmarks/kernels/bench_decode.py --tune --shapes 8:32768:32:8:128
    TRITON_INTERPRET=1 python benchmarks/kernels/bench_decode.py --smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from flashinfer_ext import BatchDecodeWithSphKVPagedKVCacheWrapper, SphKVPageEncoder  # noqa: E402
from sphkv import SphKVConfig  # noqa: E402
from sphkv.pool import TierPool  # noqa: E402
from sphkv.tiers import Tier  # noqa: E402
from sphkv_kernels.testing import fill_random, random_paged_cache  # noqa: E402

HQ, HKV, D = 32, 8, 128


# -------------------------------------------------------------------------------------------------
# timing
# -------------------------------------------------------------------------------------------------
def _time_us(fn, *, graph: bool = True, rep_ms: int = 200) -> tuple[float, str]:
    """Median device time of ``fn`` in µs, on a CUDA graph of it when it captures."""
    import triton.testing

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    mode = "eager"
    call = fn
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                fn()
            g.replay()
            torch.cuda.synchronize()
            call, mode = g.replay, "graph"
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager timing
            print(f"  (graph capture failed: {type(exc).__name__}: {str(exc)[:120]}; timing eagerly)")
            torch.cuda.synchronize()
    ms = triton.testing.do_bench(call, warmup=25, rep=rep_ms, return_mode="median")
    return ms * 1e3, mode


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    us, _ = _time_us(lambda: y.copy_(x), graph=False, rep_ms=300)
    del x, y
    torch.cuda.empty_cache()
    return 2 * nbytes / (us * 1e-6) / 1e9


# -------------------------------------------------------------------------------------------------
# methods
# -------------------------------------------------------------------------------------------------
def coded_tier(preset: str, page_size: int, head_dim: int = D) -> Tier:
    return Tier(preset, SphKVConfig.from_name(preset, head_dim=head_dim, page_size=page_size))


def ada_case(batch: int, ctx: int, tier: Tier, page_size: int, *, kernel_options=None, pages_per_split=None,
             hq: int = HQ, hkv: int = HKV, d: int = D):
    """A coded pool of ``batch`` requests × ``hkv`` kv heads × ``ctx`` tokens (random valid codes) and a planned wrapper."""
    rows = batch * hkv
    ppr = ctx // page_size
    pool = TierPool(tier, rows * ppr + 1, head_dim=d, page_size=page_size, device="cuda")
    fill_random(pool)                                            # random content, never zeros
    indptr = torch.arange(rows + 1, dtype=torch.int32) * ppr
    indices = torch.arange(1, rows * ppr + 1, dtype=torch.int32)
    w = BatchDecodeWithSphKVPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"),
                                                tiers=[tier])
    w.plan(indptr.cuda(), indices.cuda(), torch.zeros(rows * ppr, dtype=torch.int32, device="cuda"),
           torch.full((rows,), page_size, dtype=torch.int32, device="cuda"), hq, hkv, d, page_size,
           kernel_options=kernel_options, pages_per_split=pages_per_split)
    per_token = pool.kcodec.code_bytes + 2 + pool.vquant.code_bytes + 4 * pool.v_scale.shape[-1]
    kv_bytes = rows * ctx * per_token + rows * ppr * 2 * d          # codes, radii, values, scales/zeros, page means
    return w, pool, kv_bytes


def dense_case(batch: int, ctx: int, page_size: int, hq: int = HQ, hkv: int = HKV, d: int = D):
    """bf16 pages laid out [B, Hkv, ctx/P, P, d]: one buffer that is both our dense tier and SDPA's [B, Hkv, T, d]."""
    rows = batch * hkv
    ppr = ctx // page_size
    k = torch.empty(rows * ppr, page_size, d, dtype=torch.bfloat16, device="cuda").normal_()
    v = torch.empty_like(k).normal_()
    w = BatchDecodeWithSphKVPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"),
                                                tiers=[Tier("dense")])
    indptr = torch.arange(rows + 1, dtype=torch.int32) * ppr
    w.plan(indptr.cuda(), torch.arange(rows * ppr, dtype=torch.int32, device="cuda"),
           torch.zeros(rows * ppr, dtype=torch.int32, device="cuda"),
           torch.full((rows,), page_size, dtype=torch.int32, device="cuda"), hq, hkv, d, page_size)
    return w, {"k": k, "v": v}


# FlashInfer configurations: (row key, kv dtype, use_tensor_cores). ``use_tensor_cores=True`` is what SGLang's
# FlashInfer backend runs for GQA >= 4; fp8_e4m3 KV is what ``--kv-cache-dtype fp8_e4m3`` gives.
FI_KINDS = (("fi_bf16_us", "bf16", False), ("fi_bf16_tc_us", "bf16", True), ("fi_fp8_tc_us", "fp8_e4m3", True))


def flashinfer_time(batch: int, ctx: int, page_size: int, kv: str, tc: bool, q, *, hq=HQ, hkv=HKV, d=D):
    """Median µs of FlashInfer's paged decode, or ``(None, note)`` when import, JIT, plan or run fails."""
    try:
        import flashinfer
    except Exception as exc:  # noqa: BLE001
        return None, f"flashinfer not importable: {type(exc).__name__}: {str(exc)[:160]}"
    pages = batch * (ctx // page_size)
    kv_dtype = torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn
    try:
        kc = torch.empty(pages, page_size, hkv, d, dtype=torch.bfloat16, device="cuda").normal_().to(kv_dtype)
        vc = torch.empty_like(kc, dtype=torch.bfloat16).normal_().to(kv_dtype)
        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
        w.plan(torch.arange(batch + 1, dtype=torch.int32, device="cuda") * (ctx // page_size),
               torch.arange(pages, dtype=torch.int32, device="cuda"),
               torch.full((batch,), page_size, dtype=torch.int32, device="cuda"), hq, hkv, d, page_size,
               q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
        out = torch.empty_like(q)
        us, _ = _time_us(lambda: w.run(q, (kc, vc), out=out))
        return round(us, 2), None
    except Exception as exc:  # noqa: BLE001 - a JIT/plan/run failure is written into the row
        return None, f"{kv}{' tc' if tc else ''}: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------
# launch variants timed by ``tune`` (kernel alone, batch 8 x 32K); the first full variant that wins sets the sweep's
# options. ``kernel="tile"`` is the previous design (unit-key tiles on tensor cores), kept as the reference point.
TUNE_VARIANTS = [
    dict(kernel="tc", block_n=64, num_warps=2),                                       # tensor-core kernel (issue 10)
    dict(kernel="tc", block_n=64, num_warps=1),
    dict(kernel="tc", block_n=64, num_warps=4),
    dict(kernel="rowwise", block_n=64, num_warps=1, tab16=True, lut16=True),          # the row-wise defaults (run 6)
]
# diagnostics at the best options: 1 no key decode, 2 no value unpacking, 3 neither, 4 no level-1 table
# gathers, 5 no cos/sin gathers of levels >= 2 (row-wise only)
TUNE_PROFILES = [1, 2, 3]
TUNE_SPLITS = [4, 8, 16]
_LAUNCH_KEYS = ("kernel", "block_n", "num_warps", "num_stages", "maxnreg", "tab16", "lut16", "asm_values",
                "prefetch")


def tune(tier: Tier, page_size: int, batch: int, ctx: int, variants=None, profiles=None, splits=None) -> dict:
    """Time the coded-tier kernel alone under launch variants at one shape, report registers and spills,
    and time diagnostic variants that leave parts of the work out (``profile``). Then time the wrapper
    under several split-K targets. Returns the fastest full variant's options (plus ``programs_per_sm``)."""
    from sphkv_kernels import coded_decode_partial
    from sphkv_kernels.decode import rowwise_scratch_elems
    from sphkv_kernels.layout import CodedLayout

    variants = TUNE_VARIANTS if variants is None else variants
    profiles = TUNE_PROFILES if profiles is None else profiles
    splits = TUNE_SPLITS if splits is None else splits
    q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device="cuda")
    w, pool, kv_bytes = ada_case(batch, ctx, tier, page_size, kernel_options=dict(programs_per_sm=8))
    pl = w._plan                                     # the bench reads the plan's buffers (diagnostics only)
    tw = pl["sched"].tiers[0]
    lay = CodedLayout.from_pool(pool)
    qrot = (q.float() @ lay.on("cuda")["key_rotation_t"]).contiguous()
    scratch = torch.empty(rowwise_scratch_elems(lay, HQ // HKV, tw.num_items), dtype=torch.float32, device="cuda")
    args = (qrot, *pool.tensors().values(), tw.work, tw.page_ids, tw.page_lens, pl["part_o"], pl["part_lse"])
    # reference output for a sanity check of every full variant: the row-wise kernel at its defaults (validated
    # against the tile kernel and the reference in earlier runs; compiled once, reused by the first variant)
    slots = tw.work[:, 3].long()
    coded_decode_partial(*args, layout=lay, num_kv_heads=HKV, sm_scale=D ** -0.5, kernel="rowwise", scratch=scratch)
    ref_o, ref_l = pl["part_o"][slots].clone(), pl["part_lse"][slots].clone()
    best, results = None, []
    for opts in list(variants) + list(profiles):
        if isinstance(opts, int):                     # the diagnostics, at the best options so far
            if best is None or (opts >= 4 and best[1].get("kernel") != "rowwise"):
                continue
            opts = dict(best[1], profile=opts)
        t0 = time.time()
        kw = dict(layout=lay, num_kv_heads=HKV, sm_scale=D ** -0.5, scratch=scratch, **opts)
        try:
            kern = coded_decode_partial(*args, **kw)
            us, _ = _time_us(lambda: coded_decode_partial(*args, **kw), graph=True, rep_ms=100)
        except Exception as exc:  # noqa: BLE001
            print(f"  tune {opts}: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        err = None
        if "profile" not in opts:
            pl["part_o"].fill_(float("nan"))
            coded_decode_partial(*args, **kw)
            err = max(float((pl["part_o"][slots] - ref_o).abs().max()),
                      float((pl["part_lse"][slots] - ref_l).abs().max()))
        info = dict(us=round(us, 1), gb_s=round(kv_bytes / (us * 1e-6) / 1e9), n_regs=getattr(kern, "n_regs", None),
                    n_spills=getattr(kern, "n_spills", None), shared=getattr(getattr(kern, "metadata", None), "shared", None),
                    programs=tw.num_items, max_abs_diff_vs_rowwise=err, **opts)
        results.append(info)
        print(f"  kernel {opts}: {us:9.1f} us  {info['gb_s']} GB/s  regs={info['n_regs']} spills={info['n_spills']} "
              f"smem={info['shared']}  diff vs rowwise {err}  ({time.time() - t0:.1f} s incl. compile)", flush=True)
        if "profile" not in opts and err is not None and err < 5e-2 and (best is None or us < best[0]):
            best = (us, {k: v for k, v in opts.items() if k in _LAUNCH_KEYS})
    del w, pool
    torch.cuda.empty_cache()
    best_opts = dict(best[1]) if best else {}
    split = []
    for per_sm in splits:
        opts = dict(best_opts, programs_per_sm=per_sm)
        w, pool, _ = ada_case(batch, ctx, tier, page_size, kernel_options=opts)
        out = torch.empty_like(q)
        us, _ = _time_us(lambda: w.run(q, [pool], out=out), rep_ms=100)
        items = w._plan["sched"].tiers[0].num_items
        split.append(dict(programs_per_sm=per_sm, programs=items, us=round(us, 1)))
        print(f"  wrapper {opts}: {items} programs, {us:9.1f} us", flush=True)
        del w, pool
        torch.cuda.empty_cache()
    if split:
        best_opts["programs_per_sm"] = min(split, key=lambda r: r["us"])["programs_per_sm"]
    return {"best": best_opts, "shape": dict(batch=batch, context=ctx), "results": results, "split": split}


def shapes(args) -> list[tuple[int, int, int, int, int]]:
    """(batch, context, num_qo_heads, num_kv_heads, head_dim): the Llama-3.1-8B grid, then GQA 8 and head_dim 64/256."""
    if args.shapes:                           # explicit list "batch:context:hq:hkv:d,..."
        return [tuple(int(x) for x in item.split(":")) for item in args.shapes.split(",") if item]
    grid = [(b, c, HQ, HKV, D) for b in args.batches for c in args.contexts]
    first = [x for x in ((8, 32768, HQ, HKV, D), (32, 32768, HQ, HKV, D), (1, 32768, HQ, HKV, D)) if x in grid]
    out = first + [x for x in grid if x not in first]          # the target shapes first (a timeout cuts the rest)
    if args.extra_shapes:
        out[len(first):len(first)] = [(8, 32768, 64, 8, 128), (8, 32768, 32, 8, 64), (8, 32768, 32, 8, 256)]
    return out


def breakdown(w, pool, q, hkv: int, d: int, out) -> dict:
    """Where a (small-batch) ADA step goes: the coded kernel alone, the merge alone (blocked, the default; one slot
    per step, the old loop; 32 and 64 slots per step), and the slots each row's merge reads."""
    from sphkv_kernels import coded_decode_partial, merge_partials
    from sphkv_kernels.layout import CodedLayout

    pl = w._plan                                     # the bench reads the plan's buffers (diagnostics only)
    sched = pl["sched"]
    tw = sched.tiers[0]
    lay = CodedLayout.from_pool(pool)
    qrot = (q.float() @ lay.on("cuda")["key_rotation_t"]).contiguous()
    res = dict(ada_programs=tw.num_items, ada_slots_per_row=round(sched.num_slots / sched.num_rows, 1))
    kw = dict(layout=lay, num_kv_heads=hkv, sm_scale=d ** -0.5, scratch=pl["scratch"])
    planned = json.loads(pl["variants"].get(0) or "{}")     # the kernel the plan resolved (e.g. "tc" at head_dim 256)
    if planned.get("kernel", "auto") != "auto":
        kw["kernel"] = planned["kernel"]
    if 0 in pl["tables"]:                            # per-row tables: time their launch, then the kernel reading them
        from sphkv_kernels import coded_row_tables
        tkw = dict(layout=lay, num_kv_heads=hkv, sm_scale=d ** -0.5, tab16=pl["tab16s"][0])
        res["ada_tables_us"] = round(_time_us(lambda: coded_row_tables(q, qrot, pl["tables"][0], **tkw),
                                              rep_ms=100)[0], 2)
        kw.update(scratch=pl["tables"][0], row_tables=True, tab16=pl["tab16s"][0])
    args = (qrot, *pool.tensors().values(), tw.work, tw.page_ids, tw.page_lens, pl["part_o"], pl["part_lse"])
    res["ada_kernel_us"] = round(_time_us(lambda: coded_decode_partial(*args, **kw), rep_ms=100)[0], 2)
    margs = (pl["part_o"], pl["part_lse"], sched.slot_ptr, pl["rotations"], out)
    for key, spp in (("ada_merge_us", None), ("ada_merge_serial_us", 1), ("ada_merge_sb32_us", 32),
                     ("ada_merge_sb64_us", 64)):
        res[key] = round(_time_us(lambda: merge_partials(*margs, num_kv_heads=hkv, rotate_mask=pl["rotate_mask"],
                                                         slots_per_step=spp), rep_ms=100)[0], 2)
    print(f"  breakdown: {res}", flush=True)
    return res


def measure_row(dev, batch, ctx, hq, hkv, d, args, opts, copy) -> dict:
    tier = coded_tier(args.preset, args.page_size, d)
    bpe = tier.bytes_per_token(d, args.page_size) * 8 / (2 * d)
    row = dict(device=dev, batch=batch, context=ctx, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d,
               preset=args.preset, page_size=args.page_size, bits_per_element=round(bpe, 4))
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device="cuda")
    qo_bytes = 2 * q.numel() * 2
    dense_bytes = batch * ctx * hkv * d * 2 * 2
    # ADA
    try:
        w, pool, kv_bytes = ada_case(batch, ctx, tier, args.page_size, kernel_options=opts, hq=hq, hkv=hkv, d=d)
        out_a = torch.empty_like(q)
        us, row["ada_mode"] = _time_us(lambda: w.run(q, [pool], out=out_a))
        row["ada_us"] = round(us, 2)
        from sphkv_kernels.decode import DEFAULT_CODED_KERNEL
        row["ada_kernel"] = (opts or {}).get("kernel", DEFAULT_CODED_KERNEL)
        row["ada_options"] = dict(opts or {})
        row["ada_bytes"] = kv_bytes + qo_bytes
        for cmp in (args.compare if batch * ctx <= args.compare_max_tokens else ()):   # other launch options
            key = json.dumps(cmp, sort_keys=True)
            try:
                wc, pc, _ = ada_case(batch, ctx, tier, args.page_size, kernel_options=dict(opts or {}, **cmp),
                                     hq=hq, hkv=hkv, d=d)
                row.setdefault("ada_us_compare", {})[key] = round(_time_us(lambda: wc.run(q, [pc], out=out_a))[0], 2)
                del wc, pc
            except Exception as exc:  # noqa: BLE001 - a comparison must not lose the row
                row.setdefault("ada_us_compare", {})[key] = f"{type(exc).__name__}: {str(exc)[:160]}"
            print(f"  {key}: {row['ada_us_compare'][key]} us (row: {row['ada_us']})", flush=True)
        if batch <= args.breakdown_max_batch:
            try:
                row.update(breakdown(w, pool, q, hkv, d, out_a))
            except Exception as exc:  # noqa: BLE001 - a diagnostic must not lose the row
                row["breakdown_note"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        del w, pool
    except Exception as exc:  # noqa: BLE001
        row["ada_us"], row["ada_note"] = None, f"{type(exc).__name__}: {str(exc)[:200]}"
    torch.cuda.empty_cache()
    # dense bf16: our Triton kernel and SDPA on the same buffer
    w, cache = dense_case(batch, ctx, args.page_size, hq, hkv, d)
    out_d = torch.empty_like(q)
    row["triton_bf16_us"] = round(_time_us(lambda: w.run(q, [cache], out=out_d))[0], 2)
    kt = cache["k"].view(batch, hkv, ctx, d)
    vt = cache["v"].view(batch, hkv, ctx, d)
    qg = q.view(batch, hkv, hq // hkv, d)
    row["sdpa_us"] = round(_time_us(lambda: torch.nn.functional.scaled_dot_product_attention(qg, kt, vt))[0], 2)
    row["bf16_bytes"] = dense_bytes + qo_bytes
    del w, cache, kt, vt
    torch.cuda.empty_cache()
    notes = []
    for key, kv, tc in FI_KINDS:
        if args.no_flashinfer:
            row[key], why = None, "disabled"
        else:
            row[key], why = flashinfer_time(batch, ctx, args.page_size, kv, tc, q, hq=hq, hkv=hkv, d=d)
        if why:
            notes.append(why)
    if notes:
        row["flashinfer_note"] = "; ".join(sorted(set(notes)))
    ada = row.get("ada_us")
    for key, base in (("speedup_vs_bf16", "fi_bf16_us"), ("speedup_vs_bf16_tc", "fi_bf16_tc_us"),
                      ("speedup_vs_fp8_tc", "fi_fp8_tc_us"), ("speedup_vs_triton_bf16", "triton_bf16_us"),
                      ("speedup_vs_sdpa", "sdpa_us")):
        row[key] = round(row[base] / ada, 3) if ada and row.get(base) else None
    row["gb_s"] = round(row["ada_bytes"] / (ada * 1e-6) / 1e9, 1) if ada else None
    row["copy_gb_s"] = round(copy, 1)
    row["copy_fraction"] = round(row["gb_s"] / copy, 3) if ada else None
    if row.get("fi_bf16_tc_us"):
        row["fi_bf16_tc_gb_s"] = round(row["bf16_bytes"] / (row["fi_bf16_tc_us"] * 1e-6) / 1e9, 1)
    return row


def sweep(args) -> dict:
    dev = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    import triton
    print(f"device: {dev}  sms={props.multi_processor_count}  torch {torch.__version__}  triton {triton.__version__}")
    copy = copy_bandwidth_gbs()
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write)")
    tier = coded_tier(args.preset, args.page_size)
    variants = json.loads(args.variants) if args.variants else None
    profiles = [int(x) for x in args.profiles.split(",") if x] if args.profiles is not None else None
    tuned = tune(tier, args.page_size, 8, 32768, variants=variants, profiles=profiles,
                 splits=args.splits) if args.tune else {"best": {}}
    if args.options:
        tuned["best"] = json.loads(args.options)
    opts = tuned["best"]
    print(f"ADA launch options: {opts or 'defaults'}")
    rows = []
    print(_HEADER)
    for batch, ctx, hq, hkv, d in shapes(args):
        free = torch.cuda.mem_get_info()[0]
        dense_bytes = batch * ctx * hkv * d * 2 * 2
        if dense_bytes * 1.15 > free:
            print(f"skip batch={batch} ctx={ctx}: {dense_bytes / 1e9:.1f} GB of bf16 KV does not fit")
            continue
        row = measure_row(dev, batch, ctx, hq, hkv, d, args, opts, copy)
        rows.append(row)
        print(_fmt_row(row), flush=True)
        if args.out_dir:                      # partial results survive a timeout
            (Path(args.out_dir) / "decode.partial.json").write_text(json.dumps(dict(tuned=tuned, rows=rows), indent=1))
    enc = encode_costs(tier, args.page_size, args.batches, rows) if args.encode else []
    return dict(device=dev, copy_gb_s=copy, tuned=tuned, rows=rows, encode=enc,
                torch=torch.__version__, triton=triton.__version__)


def encode_costs(tier, page_size, batches, rows) -> list[dict]:
    """Cost of compressing one full page per (request, kv head) — what happens every ``page_size`` steps."""
    enc = SphKVPageEncoder(tier)
    out = []
    for batch in batches:
        n = batch * HKV
        pool = TierPool(tier, n + 1, head_dim=D, page_size=page_size, device="cuda")
        k = torch.randn(n, page_size, D, dtype=torch.bfloat16, device="cuda") * 3
        v = torch.randn_like(k)
        ids = torch.arange(1, n + 1, dtype=torch.int32, device="cuda")
        lens = torch.full((n,), page_size, dtype=torch.int32, device="cuda")
        us, _ = _time_us(lambda: enc.encode(k, v, ids, lens, pool), rep_ms=100)
        step = next((r["ada_us"] for r in rows if r["batch"] == batch and r["context"] == 32768), None)
        e = dict(batch=batch, pages=n, encode_us=round(us, 2), amortized_us_per_step=round(us / page_size, 3))
        if step:
            e["amortized_fraction_of_ada_step_32k"] = round(us / page_size / step, 4)
        out.append(e)
        print(f"encode batch={batch}: {n} pages in {us:.1f} us ({us / page_size:.2f} us/step amortized)")
    return out


_HEADER = (f"{'shape':>22} | {'ADA us':>8} {'%copy':>6} | {'FI bf16':>8} {'FI tc':>8} {'FI fp8tc':>8} | "
           f"{'x bf16tc':>8} {'x fp8tc':>8} | {'tri bf16':>8} {'sdpa':>8}")


def _f(x, fmt="{:8.1f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else f"{'n/a':>8}"


def _fmt_row(r: dict) -> str:
    shape = f"{r['batch']}x{r['context'] // 1024}K {r['num_qo_heads']}/{r['num_kv_heads']}/{r['head_dim']}"
    cf = f"{100 * r['copy_fraction']:5.1f}%" if r.get("copy_fraction") else "   n/a"
    return (f"{shape:>22} | {_f(r.get('ada_us'))} {cf} | {_f(r.get('fi_bf16_us'))} {_f(r.get('fi_bf16_tc_us'))} "
            f"{_f(r.get('fi_fp8_tc_us'))} | {_f(r.get('speedup_vs_bf16_tc'), '{:7.2f}x')} "
            f"{_f(r.get('speedup_vs_fp8_tc'), '{:7.2f}x')} | {_f(r.get('triton_bf16_us'))} {_f(r.get('sdpa_us'))}")


def write_markdown(res: dict, path: Path) -> None:
    def f(x, fmt="{:.1f}"):
        return fmt.format(x) if isinstance(x, (int, float)) else "n/a"

    lines = [f"# Decode attention: ADA vs FlashInfer ({res['device']})", "",
             f"torch {res['torch']}, triton {res['triton']}; device-to-device copy {res['copy_gb_s']:.0f} GB/s "
             f"(read + write); median device time (CUDA events, L2 flushed, CUDA graph when it captures). "
             f"FI = FlashInfer paged decode (bf16 CUDA cores, bf16 tensor cores, fp8_e4m3 KV with tensor cores).", "",
             f"ADA launch options: `{res['tuned'].get('best')}`", "",
             "| batch × context | heads q/kv/d | bits/elem | ADA µs | FI bf16 µs | FI bf16-tc µs | FI fp8-tc µs | "
             "vs bf16-tc | vs fp8-tc | ADA GB/s | % of copy | Triton bf16 µs | SDPA µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['batch']} × {r['context'] // 1024}K | {r['num_qo_heads']}/{r['num_kv_heads']}/{r['head_dim']} | "
            f"{r['bits_per_element']:.2f} | {f(r.get('ada_us'))} | {f(r.get('fi_bf16_us'))} | "
            f"{f(r.get('fi_bf16_tc_us'))} | {f(r.get('fi_fp8_tc_us'))} | {f(r.get('speedup_vs_bf16_tc'), '{:.2f}×')} | "
            f"{f(r.get('speedup_vs_fp8_tc'), '{:.2f}×')} | {f(r.get('gb_s'), '{:.0f}')} | "
            f"{f(100 * r['copy_fraction'] if r.get('copy_fraction') else None)}% | {f(r.get('triton_bf16_us'))} | "
            f"{f(r.get('sdpa_us'))} |")
    if res.get("encode"):
        lines += ["", "Encode (one full page per request × kv head, i.e. every page_size steps):", "",
                  "| batch | pages | encode µs | amortized µs/step | fraction of the ADA step at 32K |", "|---|---|---|---|---|"]
        for e in res["encode"]:
            lines.append(f"| {e['batch']} | {e['pages']} | {e['encode_us']:.1f} | {e['amortized_us_per_step']:.2f} | "
                         f"{e.get('amortized_fraction_of_ada_step_32k', 'n/a')} |")
    notes = {r.get("flashinfer_note") for r in res["rows"] if r.get("flashinfer_note")}
    notes |= {r.get("ada_note") for r in res["rows"] if r.get("ada_note")}
    if notes:
        lines += ["", "Notes: " + "; ".join(sorted(notes))]
    path.write_text("\n".join(lines) + "\n")


# -------------------------------------------------------------------------------------------------
def smoke(out_dir: Path) -> dict:
    """CPU, Triton interpreter: tiny mixed-tier batch through every path; checks agreement."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--smoke needs TRITON_INTERPRET=1 set before Python starts (CPU interpreter)")
    from sphkv.tiers import TierSet
    ts = TierSet.default(head_dim=64, page_size=16)
    cache = random_paged_cache(ts.tiers, seq_lens=[40, 23], num_kv_heads=2, head_dim=64, page_size=16, seed=1)
    q = torch.randn(2, 6, 64).bfloat16()
    res = {}
    outs = {}
    for backend in ("triton", "reference"):
        w = BatchDecodeWithSphKVPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8), tiers=ts, backend=backend)
        w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, 6, 2, 64, 16,
               page_lens=cache.page_lens, pages_per_split=2)
        t0 = time.perf_counter()
        outs[backend] = w.run(q, cache.pools).float()
        res[f"{backend}_s"] = round(time.perf_counter() - t0, 3)
    err = float((outs["triton"] - outs["reference"]).abs().max())
    res["max_abs_diff"] = err
    if not err < 2e-2:
        raise SystemExit(f"smoke: triton and reference disagree by {err}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "decode_smoke.json").write_text(json.dumps(res, indent=1))
    print(f"smoke ok: {res} -> {out_dir / 'decode_smoke.json'}")
    return res


def warm(args) -> None:
    """Compile, do not time: the Triton kernels of the sweep's shapes (``--shapes``' head configurations if given) (ADA, merge variants of the breakdown, dense)
    and FlashInfer's JIT modules (decode bf16 / bf16-tc / fp8-tc at head_dim 64/128/256, the extend bench's paged and
    ragged prefill), at tiny sizes. Run in the background while the CUDA tests run, so the timed sweep compiles nothing."""
    t0 = time.time()
    todo = ([(1, 4096, hq, hkv, d) for _, _, hq, hkv, d in shapes(args)] if args.shapes else
            [(1, 4096, HQ, HKV, D), (1, 4096, 64, HKV, D), (1, 4096, HQ, HKV, 64), (1, 4096, HQ, HKV, 256)])
    for batch, ctx, hq, hkv, d in todo:
        tier = coded_tier(args.preset, args.page_size, d)
        q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        for step, fn in (("ada", lambda: _warm_ada(batch, ctx, tier, args.page_size, q, hq, hkv, d, out)),
                         ("dense", lambda: _warm_dense(batch, ctx, args.page_size, q, hq, hkv, d, out))):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - warming must not stop the call
                print(f"warm {step} {hq}/{hkv}/{d}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        for key, kv, tc in FI_KINDS:
            us, why = flashinfer_time(1, 1024, args.page_size, kv, tc, q, hq=hq, hkv=hkv, d=d)
            print(f"warm {key} {hq}/{hkv}/{d}: {why or 'ok'} ({time.time() - t0:.0f} s)", flush=True)
    try:
        from benchmarks.kernels import bench_extend as be
        q = torch.randn(64, be.HQ, be.D, dtype=torch.bfloat16, device="cuda")
        for kv in ("bf16", "fp8_e4m3"):
            print(f"warm extend FI paged {kv}: {be.fi_paged(1, 256, 64, kv, q)}", flush=True)
        print(f"warm extend check: {be.check_small(args.preset)}", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"warm extend: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    print(f"warm done in {time.time() - t0:.0f} s", flush=True)


def _warm_ada(batch, ctx, tier, page_size, q, hq, hkv, d, out):
    w, pool, _ = ada_case(batch, ctx, tier, page_size, hq=hq, hkv=hkv, d=d)
    w.run(q, [pool], out=out)
    breakdown(w, pool, q, hkv, d, out)
    torch.cuda.synchronize()


def _warm_dense(batch, ctx, page_size, q, hq, hkv, d, out):
    w, cache = dense_case(batch, ctx, page_size, hq, hkv, d)
    w.run(q, [cache], out=out)
    torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1 (CI)")
    ap.add_argument("--warm", action="store_true", help="compile every kernel the sweep and bench_extend use; no timing")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--preset", default="sphkv-4")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--tune", dest="tune", action="store_true", help="time launch variants at 8 x 32K first")
    ap.add_argument("--variants", default=None, help="JSON list of launch variants for the tune step")
    ap.add_argument("--options", default=None, help="JSON launch options for the sweep (overrides the tuned ones)")
    ap.add_argument("--profiles", default=None, help="comma-separated diagnostic profiles for the tune step ('' none)")
    ap.add_argument("--splits", type=int, nargs="*", default=None, help="programs per SM tried by the tune step")
    ap.add_argument("--compare-max-tokens", type=int, default=32 * 32768,
                    help="--compare only at shapes with batch x context up to this")
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--compare", type=json.loads, default=[],
                    help="JSON list of launch options also timed at every shape (row key ada_us_compare), "
                         "e.g. '[{\"row_tables\": 0}]'")
    ap.add_argument("--breakdown-max-batch", type=int, default=8,
                    help="rows up to this batch also time the coded kernel and the merge alone")
    ap.add_argument("--no-extra-shapes", dest="extra_shapes", action="store_false",
                    help="only the 32/8/128 grid (default adds 64/8/128 and head_dim 64/256 at 8 x 32K)")
    ap.add_argument("--no-encode", dest="encode", action="store_false")
    ap.add_argument("--shapes", default=None, help="explicit shapes 'batch:context:hq:hkv:d,...' (overrides the grid)")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        smoke(args.out_dir or Path(tempfile.mkdtemp(prefix="sphkv-bench-")))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("the sweep needs CUDA (use --smoke on CPU)")
    if args.warm:
        warm(args)
        return 0
    out_dir = args.out_dir or _ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = sweep(args)
    res["seconds"] = round(time.time() - t0, 1)
    (out_dir / "decode.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out_dir / "decode.md")
    print(f"wrote {out_dir / 'decode.json'} and decode.md in {res['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
