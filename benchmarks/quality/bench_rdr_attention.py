# SPDX-License-Identifier: Apache-2.0
"""Attention-output check of RDR on real SmolLM2 KV (a fast proxy, not the NLL benchmark).

Runs SmolLM2-135M-Instruct once over ``N + F`` essay tokens and captures every layer's post-RoPE
queries, keys and values. The first ``N`` tokens are compressed under each method and budget with
the last ``W`` prefill queries as observation window; the next ``F`` queries then attend over the
compressed prefix plus their own dense tail (causal). Reported: the relative error of the
attention output against the full cache, averaged over layers, heads and queries. Methods: the
``sphkv.retention`` variants (``ada+rdr``, ``rdkv``, ``dense+rdr``), recency eviction (StreamingLLM
style) and ADA alone (every token at one coded tier).
Writes ``benchmarks/results/rdr_attention.json``.

Usage: ``python -m benchmarks.quality.bench_rdr_attention [--tokens 2048] [--future 64]`` (needs ``make model``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sphkv.pages import PagedStore, paged_attention
from sphkv.retention import VARIANTS, RetentionConfig, ada_tierset, compress_prefill, compress_variant, eviction_tierset

RESULTS = Path(__file__).resolve().parents[1] / "results" / "rdr_attention.json"


def capture(num_tokens: int, offset: int = 1000):
    """Per layer ``(q [1, Hq, T, d], k [1, Hkv, T, d], v)`` post-RoPE, float32, for ``num_tokens`` essay tokens."""
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sphkv_hf.data import load_essays
    from sphkv_hf.prepare_model import default_model_dir

    got = {}

    def hook(module, query, key, value, attention_mask, **kw):
        got[module.layer_idx] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("sphkv_capture", hook)
    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sphkv_capture")
    ids = tok(load_essays(), return_tensors="pt").input_ids[:, offset:offset + num_tokens]
    with torch.no_grad():
        model(ids, use_cache=False)
    return [got[i] for i in range(len(got))]


def evaluate(layers, n: int, w: int, fractions) -> list[dict]:
    pre_k = [k[:, :, :n] for _, k, _ in layers]
    pre_v = [v[:, :, :n] for _, _, v in layers]
    obs = [q[:, :, n - w:n] for q, _, _ in layers]
    fut = [(q[:, :, n:], k[:, :, n:], v[:, :, n:]) for q, k, v in layers]
    refs = []
    for q, k, v in layers:
        g = q.shape[1] // k.shape[1]
        f = q.shape[2] - n
        s = q[0, :, n:] @ k[0].repeat_interleave(g, 0).transpose(-1, -2) / q.shape[-1] ** 0.5
        mask = torch.arange(n + f)[None] > (n + torch.arange(f))[:, None]
        refs.append(torch.softmax(s.masked_fill(mask, float("-inf")), -1) @ v[0].repeat_interleave(g, 0))

    def error(attend) -> float:
        errs = [float(((attend(l)[0] - refs[l]).norm(dim=-1) / refs[l].norm(dim=-1)).mean())
                for l in range(len(layers))]
        return sum(errs) / len(errs)

    rows = []

    def run(method, fraction, res):
        e = error(lambda l: res.attention(l, fut[l][0], tail_k=fut[l][1], tail_v=fut[l][2]))
        s = res.summary()
        rows.append(dict(method=method, budget_fraction=fraction, attn_rel_err=e,
                         bits_per_element=s["bits_per_element"], tokens_per_tier=s["tokens_per_tier"],
                         dropped=s["dropped"], distortion=s["distortion"], metadata_overhead=s["metadata_overhead"],
                         position_index_overhead=s["position_index_overhead"]))
        print(f"{method:10s} {fraction:5.2f}  err {e:.4f}  bits/elem {s['bits_per_element']:.2f}  "
              f"tiers {s['tokens_per_tier']} dropped {s['dropped']}", flush=True)

    for f in fractions:
        for name in sorted(VARIANTS):
            try:
                run(name, f, compress_variant(name, pre_k, pre_v, obs, f))
            except ValueError as exc:                                   # below the protected minimum
                print(f"{name:10s} {f:5.2f}  skipped: {exc}")
        run("streaming", f, compress_prefill(pre_k, pre_v, obs, eviction_tierset(), f,
                                             config=RetentionConfig(policy="recency")))
    ts = ada_tierset()
    for t in range(1, len(ts)):
        pages = [0] * len(ts)
        pages[t] = len(layers) * pre_k[0].shape[1] * -(-n // ts.page_size)
        store = PagedStore(ts, pages, num_layers=len(layers), num_kv_heads=pre_k[0].shape[1])
        for l in range(len(layers)):
            store.write_plan(l, pre_k[l], pre_v[l], torch.full(pre_k[l].shape[1:3], t))
        frac = store.bytes().stored_bytes / (4 * pre_k[0].numel() * len(layers))
        e = error(lambda l: paged_attention(fut[l][0], store, l, tail_k=fut[l][1], tail_v=fut[l][2]))
        rows.append(dict(method=f"ada-alone:{ts.tiers[t].name}", budget_fraction=frac, attn_rel_err=e))
        print(f"ada-alone {ts.tiers[t].name:8s} at {frac:.3f} of bf16  err {e:.4f}", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--future", type=int, default=64)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    layers = capture(args.tokens + args.future)
    rows = evaluate(layers, args.tokens, args.window, args.fractions)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(model="SmolLM2-135M-Instruct", tokens=args.tokens, future=args.future,
                                        window=args.window, rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
