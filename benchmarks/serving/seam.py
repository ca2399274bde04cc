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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=576)
    ap.add_argument("--no-window", action="store_true", help="skip the sliding-window row (no SGLang needed)")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.ctx < 1:
        raise SystemExit(f"--batch {args.batch} and --ctx {args.ctx} must be >= 1")
    torch.set_num_threads(1)
    rows = (store_rows(args.batch, args.ctx) + ([] if args.no_window else window_rows())
            + ragged_rows(args.batch, args.ctx))
    print(f"{'row':<16}{'min ms':>10}{'median ms':>12}")
    for r in rows:
        print(f"{r['name']:<16}{r['min_ms']:>10.2f}{r['median_ms']:>12.2f}")
    rec = dict(rows=rows, clock="process_time (one thread)", loadavg_1min=os.getloadavg()[0])
    with open(args.out, "w") as fh:
        json.dump(rec, fh, indent=1)


if __name__ == "__main__":
    main()
