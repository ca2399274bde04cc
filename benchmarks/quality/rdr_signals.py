# SPDX-License-Identifier: Apache-2.0
"""Diagnosis: does a query-agnostic retention signal point at the retrieval needles? (issue 13, RDR at 10%)

``python -m benchmarks.quality.rdr_signals --corpus essays --context 2048 [--keep 0.3] [--out JSON]``

Builds the harness's retrieval haystack for one (corpus, context) (:class:`benchmarks.quality.tasks.ContextTask`),
computes each signal per (layer, kv head, token) and reports which fraction of the needle tokens falls in the
signal's top ``keep`` per (layer, kv head) (``keep = 0.3``: about what ``ada+rdr@0.10`` keeps) against the fraction
of the other tokens. A signal that could keep the needles at 10% needs the first well above the second; a
needle-agnostic signal gives both ≈ ``keep``. The needle tokens are located from the answers
(:func:`benchmarks.quality.sweep_rdr.needle_mask`: each value's tokens and the 12 before) — diagnosis only;
no method sees them. The first 4 tokens (the dense sinks) are left out.

Signals (all query-agnostic; see :mod:`sphkv.retention.utility`):

* ``window`` — attention of the last 32 context queries, avg-pooled over 5 (today's RDR utility, SnapKV).
* ``pooled`` — max attention of queries strided every 32 tokens plus the window.
* ``surprisal``, ``surprisal-k9`` — ``-log p(x_t | x_<t)`` from the prefill (max-pooled over 9 tokens).
* ``reconstruction`` — KVzip-style: max attention a context token draws while the model repeats the context.
* ``repeat-surprisal-k9`` — surprisal of each token inside that repeat (what the model fails to copy), pooled.
* ``key-diversity`` — ``1 - cos(k, mean key)`` of its (layer, kv head) (KeyDiff-style).
* ``key-local-novelty`` — distance of the key from the mean key of its 65 neighbours.
* ``value-norm`` — ``‖v‖``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sphkv.retention.utility import information_score, layer_utility, make_policy

RESULTS = Path(__file__).resolve().parent.parent / "results"


def _per_head(x: torch.Tensor, shape) -> torch.Tensor:
    return x.expand(shape) if x.dim() == 1 else x


def _repeat_surprisal(task, hay, hctx) -> torch.Tensor:
    """``[N]`` surprisal of each context token when the model repeats the context (one cache-less forward)."""
    from .tasks import REPEAT_PROMPT

    ids = hay.ids
    prompt = torch.tensor(task.tok(REPEAT_PROMPT, add_special_tokens=False).input_ids, dtype=ids.dtype)
    full = torch.cat([ids, prompt, ids])
    own = task.model.config._attn_implementation
    task.model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            logits = task.model(input_ids=full[None], logits_to_keep=ids.numel() + 1).logits[0, :-1].float()
    finally:
        task.model.set_attn_implementation(own)
    return F.cross_entropy(logits, ids, reduction="none")


def signals(task) -> dict[str, torch.Tensor]:
    """``name -> [L, Hkv, N]`` float32 for the haystack of ``task``."""
    hay, hctx = task.haystacks[0]
    k = torch.stack([x[0].float() for x in hctx.keys])                       # [L, Hkv, N, d]
    v = torch.stack([x[0].float() for x in hctx.values])
    shape = k.shape[:-1]
    keys = [x.float() for x in hctx.keys]
    out = {"window": layer_utility(make_policy("snapkv"), keys, hctx.queries),
           "pooled": layer_utility(make_policy("pooled"), keys, hctx.pooled_queries,
                                   q_positions=hctx.pooled_positions)}
    s = hctx.surprisal()
    out["surprisal"] = _per_head(s, shape)
    out["surprisal-k9"] = _per_head(information_score(s, kernel=9), shape)
    out["reconstruction"] = hctx.reconstruction()
    out["repeat-surprisal-k9"] = _per_head(information_score(_repeat_surprisal(task, hay, hctx), kernel=9), shape)
    mean = k[..., 4:, :].mean(-2, keepdim=True)
    out["key-diversity"] = 1 - F.cosine_similarity(k, mean, dim=-1)
    n, d = k.shape[-2], k.shape[-1]
    flat = k.permute(0, 1, 3, 2).reshape(-1, 1, n)
    local = F.avg_pool1d(flat, 65, 1, 32, count_include_pad=False).reshape(*shape[:2], d, n).permute(0, 1, 3, 2)
    out["key-local-novelty"] = (k - local).norm(dim=-1)
    out["value-norm"] = v.norm(dim=-1)
    return out


def needle_share(score: torch.Tensor, mask: torch.Tensor, keep: float, sinks: int = 4) -> dict:
    """Fraction of needle / other tokens inside the top ``keep`` of ``score`` ``[L, Hkv, N]`` per (layer, kv head)."""
    z = score[..., sinks:]
    m = mask[sinks:]
    top = z >= z.quantile(1 - keep, dim=-1, keepdim=True)
    return {"needle_in_top": float(top[..., m].float().mean()), "other_in_top": float(top[..., ~m].float().mean()),
            "needle_in_top_per_layer": [round(float(top[i][:, m].float().mean()), 3) for i in range(top.shape[0])]}


def main(argv=None) -> None:
    from .models import load_model
    from .run import corpus_ids
    from .sweep_rdr import needle_mask
    from .tasks import ContextTask

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", default="essays")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--keep", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="JSON; rows of an existing file are kept (one per key)")
    args = ap.parse_args(argv)
    if not 0.0 < args.keep < 1.0:
        raise SystemExit(f"--keep={args.keep} must be in (0, 1)")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_model(args.model)
    task = ContextTask(model, tok, corpus_ids(tok, args.corpus, args.context + 257), args.context, score_len=256)
    mask = needle_mask(task)
    row = {"model": args.model, "corpus": args.corpus, "context": args.context, "keep": args.keep,
           "needle_tokens": int(mask.sum()), "signals": {}}
    for name, score in signals(task).items():
        row["signals"][name] = needle_share(score, mask, args.keep)
        r = row["signals"][name]
        print(f"[signals] {args.corpus}/{args.context} {name:22s} needle tokens in top {args.keep:.0%}: "
              f"{r['needle_in_top']:.3f}, other tokens: {r['other_in_top']:.3f}", flush=True)
    row["seconds"] = round(time.time() - t0, 1)
    row["load"] = os.getloadavg()[0]
    if args.out:
        rows = json.loads(args.out.read_text()) if args.out.exists() else []
        rows = [r for r in rows if (r["model"], r["corpus"], r["context"]) != (args.model, args.corpus, args.context)]
        args.out.write_text(json.dumps(rows + [row], indent=1) + "\n")


if __name__ == "__main__":
    main()
