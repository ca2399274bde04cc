# SPDX-License-Identifier: Apache-2.0
"""End-to-end decode step of a synthetic Llama-3.1-8B-shaped model: Spherical KV vs dense bf16 / fp8 KV.

32 decoder layers (hidden 4096, 32 query / 8 kv heads of 128, SwiGLU 14336, RMSNorm, rotary
embedding) plus the LM head (vocab 128256), random bf16 weights; batch 8 at 32K context. One step
embeds one new token per request, runs every layer (QKV, RoPE, KV append, attention, O, MLP) and
the LM head. Dense, in the same run: bf16 KV with FlashInfer's paged decode on CUDA cores (``dense``; SDPA when
FlashInfer is not importable) and on tensor cores (``dense_bf16_tc``: what SGLang runs for GQA >= 4), and fp8_e4m3 KV
on tensor cores (``dense_fp8_tc``); each has ``speedup_of_sphkv`` (its step time / the sphkv step time). Spherical KV: each (request, kv head) holds 511 pages of sphkv-4
codes and one dense bf16 page with the recent tokens (where the new token is appended), attention
through ``BatchDecodeWithSphKVPagedKVCacheWrapper`` (two tiers, one merge). Each layer has its own
cache. The step is captured in a CUDA graph; we report the median replay time (CUDA events) and
tokens/s. Page compression (encode) is measured separately in ``bench_decode.py``.

Usage: ``python benchmarks/kernels/bench_e2e.py [--batch 8] [--context 32768] [--out benchmarks/results/decode_e2e.json]``
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from flashinfer_ext import BatchDecodeWithSphKVPagedKVCacheWrapper  # noqa: E402
from sphkv import SphKVConfig  # noqa: E402
from sphkv.pool import TierPool  # noqa: E402
from sphkv.tiers import Tier  # noqa: E402
from sphkv_kernels.testing import fill_random  # noqa: E402

H, HQ, HKV, D, FFN, VOCAB, LAYERS, P = 4096, 32, 8, 128, 14336, 128256, 32, 64


def rms_norm(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x, cos, sin):
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Model:
    def __init__(self, batch: int):
        g = dict(device="cuda", dtype=torch.bfloat16)
        self.layers = []
        for _ in range(LAYERS):
            self.layers.append(dict(
                ln1=torch.ones(H, **g), ln2=torch.ones(H, **g),
                wqkv=torch.randn(H, (HQ + 2 * HKV) * D, **g) * 0.02, wo=torch.randn(HQ * D, H, **g) * 0.02,
                wgu=torch.randn(H, 2 * FFN, **g) * 0.02, wd=torch.randn(FFN, H, **g) * 0.02))
        self.emb = torch.randn(VOCAB, H, **g) * 0.02
        self.lm = torch.randn(H, VOCAB, **g) * 0.02
        self.norm = torch.ones(H, **g)
        self.batch = batch

    def step(self, tokens, cos, sin, attend):
        x = self.emb[tokens]                                                   # [B, H]
        for i, lyr in enumerate(self.layers):
            h = rms_norm(x, lyr["ln1"])
            qkv = h @ lyr["wqkv"]
            q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], -1)
            q = rope(q.view(-1, HQ, D), cos, sin)
            k = rope(k.view(-1, HKV, D), cos, sin)
            o = attend(i, q, k, v.view(-1, HKV, D))                            # [B, HQ, D]
            x = x + o.reshape(-1, HQ * D) @ lyr["wo"]
            h = rms_norm(x, lyr["ln2"])
            gu = h @ lyr["wgu"]
            x = x + (F.silu(gu[:, :FFN]) * gu[:, FFN:]) @ lyr["wd"]
        return (rms_norm(x, self.norm) @ self.lm).argmax(-1)


# dense baselines: (result key, KV dtype, FlashInfer use_tensor_cores). bf16 on tensor cores is what SGLang's FlashInfer
# backend runs for GQA >= 4; fp8_e4m3 KV on tensor cores is ``--kv-cache-dtype fp8_e4m3``.
DENSE_KINDS = (("bf16", "bf16", False), ("bf16_tc", "bf16", True), ("fp8_tc", "fp8_e4m3", True))


def dense_attention(batch: int, ctx: int, kv: str = "bf16", tc: bool = False):
    """Per-layer paged caches (bf16 or fp8_e4m3); FlashInfer decode if importable, else SDPA on contiguous bf16 caches
    (``kv="bf16"`` only: the fp8 baseline is FlashInfer's or nothing)."""
    pages = batch * ctx // P
    kv_dtype = torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn
    try:
        import flashinfer
        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
        caches = [(torch.empty(pages, P, HKV, D, dtype=torch.bfloat16, device="cuda").normal_().to(kv_dtype),
                   torch.empty(pages, P, HKV, D, dtype=torch.bfloat16, device="cuda").normal_().to(kv_dtype))
                  for _ in range(LAYERS)]
        last = torch.full((batch,), P, dtype=torch.int32, device="cuda")
        w.plan(torch.arange(batch + 1, dtype=torch.int32, device="cuda") * (ctx // P),
               torch.arange(pages, dtype=torch.int32, device="cuda"), last, HQ, HKV, D, P,
               q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
        slot_page = torch.arange(batch, device="cuda") * (ctx // P) + ctx // P - 1      # the new token's page/slot

        def attend(i, q, k, v):
            kc, vc = caches[i]
            kc[slot_page, P - 1] = k.to(kv_dtype)
            vc[slot_page, P - 1] = v.to(kv_dtype)
            return w.run(q, caches[i])
        return attend, f"flashinfer{' tensor cores' if tc else ''}"
    except Exception as exc:  # noqa: BLE001
        if kv != "bf16":
            raise
        print(f"flashinfer unavailable ({type(exc).__name__}: {str(exc)[:100]}); dense baseline = SDPA")
    caches = [(torch.empty(batch, HKV, ctx, D, dtype=torch.bfloat16, device="cuda").normal_(),
               torch.empty(batch, HKV, ctx, D, dtype=torch.bfloat16, device="cuda").normal_()) for _ in range(LAYERS)]

    def attend(i, q, k, v):
        kc, vc = caches[i]
        kc[:, :, ctx - 1] = k
        vc[:, :, ctx - 1] = v
        o = F.scaled_dot_product_attention(q.view(batch, HKV, HQ // HKV, D), kc, vc)
        return o.reshape(batch, HQ, D)
    return attend, "sdpa"


def sphkv_attention(batch: int, ctx: int, preset: str, kernel_options=None):
    coded = Tier(preset, SphKVConfig.from_name(preset, head_dim=D, page_size=P))
    tiers = [Tier("dense"), coded]
    rows = batch * HKV
    ppr = ctx // P
    pools = []
    for _ in range(LAYERS):
        dense = TierPool(tiers[0], rows + 1, head_dim=D, page_size=P, device="cuda")
        dense.k.normal_()
        dense.v.normal_()
        cp = TierPool(coded, rows * (ppr - 1) + 1, head_dim=D, page_size=P, device="cuda")
        fill_random(cp)
        pools.append([dense, cp])
    # row r: coded pages r*(ppr-1)+1 .. , then dense page r+1 (recent window, full after the append)
    counts = torch.full((rows,), ppr, dtype=torch.int64)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    indices, tier_ids = [], []
    for r in range(rows):
        indices += list(range(r * (ppr - 1) + 1, (r + 1) * (ppr - 1) + 1)) + [r + 1]
        tier_ids += [1] * (ppr - 1) + [0]
    w = BatchDecodeWithSphKVPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"), tiers=tiers)
    w.plan(indptr.cuda(), torch.tensor(indices, dtype=torch.int32, device="cuda"),
           torch.tensor(tier_ids, dtype=torch.int32, device="cuda"), torch.full((rows,), P, dtype=torch.int32, device="cuda"),
           HQ, HKV, D, P, kernel_options=kernel_options)
    recent = torch.arange(1, rows + 1, device="cuda").view(batch, HKV)

    def attend(i, q, k, v):
        dense = pools[i][0]
        dense.k[recent, P - 1] = k
        dense.v[recent, P - 1] = v
        return w.run(q, pools[i])
    return attend, f"sphkv ({preset} pages + 1 dense recent page per row)"


def time_step(model, attend, batch) -> float:
    tokens = torch.randint(0, VOCAB, (batch,), device="cuda")
    pos = torch.full((batch, 1), 32767.0, device="cuda")
    inv = 1.0 / (500000.0 ** (torch.arange(0, D // 2, device="cuda") / (D // 2)))
    ang = pos * inv
    cos, sin = ang.cos().to(torch.bfloat16)[:, None, :], ang.sin().to(torch.bfloat16)[:, None, :]
    fn = lambda: model.step(tokens, cos, sin, attend)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(30):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--preset", default="sphkv-4")
    ap.add_argument("--kernel-options", type=json.loads, default=None,
                    help='JSON, e.g. {"block_n": 64, "num_warps": 4, "num_stages": 1, "programs_per_sm": 8}')
    ap.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results" / "decode_e2e.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    model = Model(args.batch)
    res = dict(device=torch.cuda.get_device_name(), batch=args.batch, context=args.context, layers=LAYERS,
               torch=torch.__version__, kernel_options=args.kernel_options)
    attend, name = sphkv_attention(args.batch, args.context, args.preset, args.kernel_options)
    ms = time_step(model, attend, args.batch)
    res["sphkv"] = dict(method=name, step_ms=round(ms, 3), tokens_per_s=round(args.batch / ms * 1e3, 1))
    print(f"{name}: {ms:.3f} ms/step, {args.batch / ms * 1e3:.1f} tokens/s", flush=True)
    del attend
    torch.cuda.empty_cache()
    for key, kv, tc in DENSE_KINDS:
        rk = "dense" if key == "bf16" else f"dense_{key}"
        try:
            attend, name = dense_attention(args.batch, args.context, kv, tc)
            ms = time_step(model, attend, args.batch)
        except Exception as exc:  # noqa: BLE001 - a failed baseline is written into the result, never a crash
            res[rk] = dict(method=f"{kv} KV", note=f"{type(exc).__name__}: {str(exc)[:200]}")
            print(f"dense {key}: failed {res[rk]['note']}", flush=True)
            continue
        finally:
            attend = None
            torch.cuda.empty_cache()
        res[rk] = dict(method=f"{kv} KV, {name}", step_ms=round(ms, 3), tokens_per_s=round(args.batch / ms * 1e3, 1))
        res[rk]["speedup_of_sphkv"] = round(ms / res["sphkv"]["step_ms"], 3)
        print(f"dense {key} ({name}): {ms:.3f} ms/step, {args.batch / ms * 1e3:.1f} tokens/s", flush=True)
    res["speedup"] = res.get("dense", {}).get("speedup_of_sphkv")
    res["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
