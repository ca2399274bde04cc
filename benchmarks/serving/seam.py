# SPDX-License-Identifier: Apache-2.0
"""Seam timings of the served path without a server: the store, pool, backend and wrappers built the way
SGLang builds them (SmolLM2-135M shapes), timed in CPU seconds of one thread (``time.process_time``), so
that other jobs on a shared machine move the figures less than wall-clock time would.

Rows:

* ``prefill_write`` — one forward's K/V of ``batch`` requests × ``ctx`` tokens written to every layer
  (pages coded straight from the new K/V); min of 3 (store reset between).
* ``decode_step`` — one decode step: page bookkeeping, the batch plan (the backend's decode plan,
  ``plan_pages_static`` with rows as wide as the longest request), then per layer the write of the new
  token and the prefill wrapper's attention (CPU kernels); min / median of 6 blocks of 10 steps.
* ``window_decode`` — one decode forward of the real ``SphKVAttnBackend`` over a ``SphKVPool`` with a
  sliding layer (window 37, page 16) and a global layer, 8 requests (needs SGLang importable); min / median
  of 5 blocks of 6 forwards.
* ``extend_new_ragged`` / ``extend_new_loop`` — one layer's attention of an extend batch's new tokens among
  themselves (SmolLM2 shapes: 9 query heads, 3 kv heads, head_dim 64, bf16; ``batch`` requests of
  ``ctx``, ``ctx - 37``, ... tokens, and one chunk of ``chunk`` tokens): the backend's one padded-batch call
  (``sphkv_sglang.ragged.ragged_attention``; ``_f32``: in float32, the backend's choice when the state is merged
  with a cached prefix) and the former per-request float32 loop (``ragged_attention_reference``); min / median of 3.

* :func:`cpu_path_rows` — the flash route of an extend's prefix, the C++ page encoder and the cascade decode
  (``--only-cpu-path``: these rows alone).

Usage::

    python -m benchmarks.serving.seam --out /tmp/seam.json          # prints a table, writes JSON
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from types import SimpleNamespace

import torch

clock = time.process_time


def _row(name: str, samples: list[float], **params) -> dict:
    return dict(name=name, min_ms=1e3 * min(samples), median_ms=1e3 * statistics.median(samples),
                samples=len(samples), **params)


def store_rows(batch: int, ctx: int) -> list[dict]:
    """``prefill_write`` and ``decode_step`` (SmolLM2 shapes: 30 layers, 3 kv / 9 query heads, head_dim 64)."""
    from flashinfer_ext import BatchPrefillWithSphKVPagedKVCacheWrapper
    from sphkv_kernels.cpu_decode import available
    from sphkv_sglang.config import SphKVServeConfig
    from sphkv_sglang.store import SphKVStore

    L, H, D, P, HQ = 30, 3, 64, 64, 9
    cfg = SphKVServeConfig(preset="sphkv-4", page_size=P, max_running_requests=8)
    st = SphKVStore(cfg, num_pages=400, num_layers=L, num_kv_heads=H, head_dim=D, dtype=torch.bfloat16)
    w = BatchPrefillWithSphKVPagedKVCacheWrapper(tiers=st.wrapper_tiers, backend="cpu" if available() else "reference")
    npg = (ctx + P) // P + 1
    rows = torch.zeros(batch, 4096, dtype=torch.int32)
    for b in range(batch):
        rows[b, :npg * P] = torch.arange((1 + b * npg) * P, (1 + (b + 1) * npg) * P)
    loc = torch.cat([rows[b, :ctx].long() for b in range(batch)])
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(loc.numel(), H, D, generator=g).bfloat16(), torch.randn(loc.numel(), H, D, generator=g).bfloat16())
          for _ in range(L)]
    pre = []
    for _ in range(3):
        st.reset()
        t0 = clock()
        for layer in range(L):
            st.write(layer, loc, *kv[layer])
        pre.append(clock() - t0)
    seq = torch.full((batch,), ctx, dtype=torch.int64)
    q = torch.randn(batch, HQ, D, generator=g).bfloat16()
    knew = torch.randn(batch, H, D, generator=g).bfloat16()

    def step():
        nonlocal seq
        seq = seq + 1
        out_loc = rows[torch.arange(batch), seq - 1].long()
        st.begin_forward(out_loc)
        pp = st.plan_pages_static(rows, seq, -(-int(seq.max()) // P))   # the backend's decode plan
        w.plan(torch.arange(batch + 1), pp["indptr"], pp["indices"], pp["page_tiers"], None, HQ, H, D, P,
               page_lens=pp["page_lens"], device="cpu")
        for layer in range(L):
            st.write(layer, out_loc, knew, knew)
            w.run(q, st.layer_cache(layer), sm_scale=D ** -0.5)

    for _ in range(3):
        step()
    blocks = []
    for _ in range(6):
        t0 = clock()
        for _ in range(10):
            step()
        blocks.append((clock() - t0) / 10)
    return [_row("prefill_write", pre, batch=batch, ctx=ctx), _row("decode_step", blocks, batch=batch, ctx=ctx)]


def window_rows(batch: int = 8) -> list[dict]:
    """``window_decode``: the backend with one sliding (window 37) and one global layer, page 16."""
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.runtime_context import get_parallel

    from sphkv_sglang.backend import SphKVAttnBackend
    from sphkv_sglang.config import SphKVServeConfig
    from sphkv_sglang.pool import SphKVPool

    P, H, G, D, NPG = 16, 2, 3, 64, 12
    cfg = SphKVServeConfig(preset="sphkv-4", page_size=P, max_running_requests=batch, staging_pages=2 * batch + 2)
    pool = SphKVPool((batch * NPG + 2) * P, P, torch.bfloat16, H, D, 2, "cpu", False, sphkv_config=cfg)
    rt = torch.zeros(batch, NPG * P, dtype=torch.int32)
    for r in range(batch):
        rt[r] = torch.arange((1 + r * NPG) * P, (1 + (r + 1) * NPG) * P)
    runner = SimpleNamespace(token_to_kv_pool=pool, device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=rt),
                             model_config=SimpleNamespace(num_attention_heads=H * G,
                                                          get_max_num_attention_heads=lambda: H * G))
    with get_parallel().override(attn_tp_size=1):
        be = SphKVAttnBackend(runner)
    layers = [SimpleNamespace(layer_id=i, tp_q_head_num=H * G, tp_k_head_num=H, qk_head_dim=D, v_head_dim=D,
                              scaling=D ** -0.5, logit_cap=0.0, sliding_window_size=w, is_cross_attention=False,
                              attn_type=AttentionType.DECODER) for i, w in ((0, 37), (1, -1))]
    g = torch.Generator().manual_seed(0)

    def forward(q_lens, prefix, decode):
        seq = torch.tensor([p + n for p, n in zip(prefix, q_lens)])
        loc = torch.cat([rt[b, p:p + n].long() for b, (p, n) in enumerate(zip(prefix, q_lens))])
        mode = SimpleNamespace(is_decode_or_idle=lambda: decode)
        fb = SimpleNamespace(forward_mode=mode, batch_size=batch, out_cache_loc=loc, req_pool_indices=torch.arange(batch),
                             seq_lens=seq, seq_lens_cpu=seq, extend_seq_lens_cpu=list(q_lens),
                             extend_seq_lens=torch.tensor(q_lens))
        n = sum(q_lens)
        qkv = [(torch.randn(n, H * G * D, generator=g).bfloat16(), torch.randn(n, H * D, generator=g).bfloat16(),
                torch.randn(n, H * D, generator=g).bfloat16()) for _ in layers]
        t0 = clock()
        be.init_forward_metadata(fb)
        for layer, (q, k, v) in zip(layers, qkv):
            (be.forward_decode if decode else be.forward_extend)(q, k, v, layer, fb)
        return clock() - t0

    lens = [100 + 7 * r for r in range(batch)]
    forward(lens, [0] * batch, False)
    cur = list(lens)
    for _ in range(3):
        forward([1] * batch, cur, True)
        cur = [c + 1 for c in cur]
    blocks = []
    for _ in range(5):
        tot = 0.0
        for _ in range(6):
            tot += forward([1] * batch, cur, True)
            cur = [c + 1 for c in cur]
        blocks.append(tot / 6)
    return [_row("window_decode", blocks, batch=batch, window=37, page_size=P)]


def ragged_rows(batch: int, ctx: int, chunk: int = 4096) -> list[dict]:
    from sphkv_sglang.ragged import ragged_attention, ragged_attention_reference

    gen = torch.Generator().manual_seed(0)
    rows = []
    for lens in ([max(1, ctx - 37 * i) for i in range(batch)], [chunk]):
        T = sum(lens)
        q = torch.randn(T, 9, 64, generator=gen).bfloat16()
        k, v = (torch.randn(T, 3, 64, generator=gen).bfloat16() for _ in range(2))
        f32 = lambda *a, **kw: ragged_attention(*a, **kw, compute_dtype=torch.float32)  # noqa: E731
        for name, fn in (("extend_new_ragged", ragged_attention), ("extend_new_ragged_f32", f32),
                         ("extend_new_loop", ragged_attention_reference)):
            samples = []
            for _ in range(3):
                t0 = clock()
                fn(q, k, v, lens, scale=0.125)
                samples.append(clock() - t0)
            rows.append(_row(name, samples, q_lens=lens))
    return rows


def cpu_path_rows() -> list[dict]:
    """Rows of this stop's CPU levers (SmolLM2 shapes; min / median of 3-5 runs):

    * ``extend_prefix_{off,float32,bfloat16}`` — one layer's prefix part of an extend, 300 new tokens over 24 coded
      64-token pages (3 kv heads, 9 query heads) through ``coded_prefix_attention_cpu``: the per-page route and the
      flash route's two tile dtypes;
    * ``page_coding_{codec,cpu}`` — ``SphKVStore.write`` of 16 requests x 128 new tokens, all 30 layers (pages coded
      from the new K/V): the codec's ``write_pages`` vs the C++ encoder through ``SphKVPageEncoder``;
    * ``decode_shared_{no_cascade,cascade}`` — plan + 30 layers of the prefill wrapper for a decode batch of 8
      requests sharing 4 coded pages and owning one 40-token staged page each.
    """
    from flashinfer_ext import BatchPrefillWithSphKVPagedKVCacheWrapper
    from sphkv import SphKVConfig
    from sphkv.pool import TierPool
    from sphkv.tiers import Tier
    from sphkv_kernels import cpu_decode as cpu
    from sphkv_kernels.layout import CodedLayout
    from sphkv_kernels.testing import fill_random
    from sphkv_sglang.config import SphKVServeConfig
    from sphkv_sglang.store import SphKVStore

    rows = []
    P, D, H, G, T, NP = 64, 64, 3, 3, 300, 24
    tier = Tier("sphkv-4", SphKVConfig.from_name("sphkv-4", head_dim=D, page_size=P))
    pool = TierPool(tier, NP * H, head_dim=D, page_size=P)
    fill_random(pool)
    lay = CodedLayout.from_config(tier.config)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, H * G, D, generator=g)
    items = torch.tensor([[0, T, h, h * NP, (h + 1) * NP, 0] for h in range(H)], dtype=torch.int64)
    ids, lens = torch.arange(H * NP, dtype=torch.int32), torch.full((H * NP,), P, dtype=torch.int32)
    c = pool.tensors()
    for flash in ("off", "float32", "bfloat16"):
        samples = []
        for _ in range(4):
            out, lse = torch.zeros(T, H * G, D), torch.full((T, H * G), float("-inf"))
            t0 = clock()
            cpu.coded_prefix_attention_cpu(q, *(c[k] for k in ("k_codes", "k_radius", "k_mean", "v_codes", "v_scale",
                                                                 "v_zero")), items, ids, lens, out, lse, layout=lay,
                                           num_kv_heads=H, sm_scale=0.125, merge=True, flash=flash)
            samples.append(clock() - t0)
        rows.append(_row(f"extend_prefix_{flash}", samples[1:], new_tokens=T, coded_pages=NP))
    L = 30
    for name in ("codec", "cpu"):
        st = SphKVStore(SphKVServeConfig(preset="sphkv-4", page_size=P, max_running_requests=8), num_pages=400,
                        num_layers=L, num_kv_heads=H, head_dim=D, dtype=torch.bfloat16)
        if name == "codec":
            st._encoders = None
        loc = torch.arange(P, P + 16 * 128)
        kv = [(torch.randn(loc.numel(), H, D, generator=g).bfloat16(), torch.randn(loc.numel(), H, D,
                                                                                   generator=g).bfloat16())
              for _ in range(L)]
        samples = []
        for _ in range(3):
            st.reset()
            t0 = clock()
            for layer in range(L):
                st.write(layer, loc, *kv[layer])
            samples.append(clock() - t0)
        rows.append(_row(f"page_coding_{name}", samples, requests=16, tokens=128, layers=L))
    st = SphKVStore(SphKVServeConfig(preset="sphkv-4", page_size=P, max_running_requests=8), num_pages=400,
                    num_layers=L, num_kv_heads=H, head_dim=D, dtype=torch.bfloat16)
    B, SP, OWN = 8, 4, 40
    rt = torch.zeros(B, 4096, dtype=torch.int64)
    shared = torch.arange(P, (1 + SP) * P)
    for b in range(B):
        rt[b, :SP * P] = shared
        rt[b, SP * P:(SP + 1) * P] = torch.arange((1 + SP + b) * P, (2 + SP + b) * P)
    own = torch.cat([rt[b, SP * P:SP * P + OWN] for b in range(B)])
    for loc in (shared, own):
        for layer in range(L):
            st.write(layer, loc, torch.randn(loc.numel(), H, D, generator=g).bfloat16(),
                     torch.randn(loc.numel(), H, D, generator=g).bfloat16())
    seq = torch.full((B,), SP * P + OWN)
    qd = torch.randn(B, H * G, D, generator=g).bfloat16()
    for cascade in (False, True):
        w = BatchPrefillWithSphKVPagedKVCacheWrapper(tiers=st.wrapper_tiers, backend="cpu")
        samples = []
        for _ in range(6):
            t0 = clock()
            pp = st.plan_pages_static(rt, seq, SP + 1)
            w.plan(torch.arange(B + 1), pp["indptr"], pp["indices"], pp["page_tiers"], None, H * G, H, D, P,
                   page_lens=pp["page_lens"], device="cpu", kernel_options={"cascade": cascade})
            for layer in range(L):
                w.run(qd, st.layer_cache(layer), sm_scale=D ** -0.5)
            samples.append(clock() - t0)
        rows.append(_row("decode_shared_" + ("cascade" if cascade else "no_cascade"), samples[1:], batch=B,
                         shared_pages=SP, own_tokens=OWN, layers=L))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=576)
    ap.add_argument("--no-window", action="store_true", help="skip the sliding-window row (no SGLang needed)")
    ap.add_argument("--only-cpu-path", action="store_true",
                    help="only the extend-prefix / page-coding / shared-decode rows (cpu_path_rows)")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.ctx < 1:
        raise SystemExit(f"--batch {args.batch} and --ctx {args.ctx} must be >= 1")
    torch.set_num_threads(1)
    if args.only_cpu_path:
        rows = cpu_path_rows()
    else:
        rows = (store_rows(args.batch, args.ctx) + ([] if args.no_window else window_rows())
                + ragged_rows(args.batch, args.ctx) + cpu_path_rows())
    print(f"{'row':<26}{'min ms':>10}{'median ms':>12}")
    for r in rows:
        print(f"{r['name']:<26}{r['min_ms']:>10.2f}{r['median_ms']:>12.2f}")
    rec = dict(rows=rows, clock="process_time (one thread)", loadavg_1min=os.getloadavg()[0])
    with open(args.out, "w") as fh:
        json.dump(rec, fh, indent=1)


if __name__ == "__main__":
    main()
