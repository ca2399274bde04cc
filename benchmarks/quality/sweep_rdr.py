# SPDX-License-Identifier: Apache-2.0
"""Continuation-NLL-only sweep of retention configs on one (model, corpus, context): no retrieval.

``python -m benchmarks.quality.sweep_rdr --corpus essays --context 2048 --score-len 512 \
    --spec 'ada+rdr@0.10' --spec 'ada+rdr-v0@0.10' --spec 'ada+rdr@0.10:prior=0' ...``

One dense prefill (the same tokens and the same ``PrefillContext`` as :class:`benchmarks.quality.tasks.ContextTask`,
whose first ``score_len`` scored targets are the harness's), then for each spec the method's compressed prefix and
one continuation forward. A spec is a registered method name, optionally followed by ``:key=value,...`` overrides
of its :class:`sphkv.retention.RetentionConfig` (RDR methods only; values parsed as Python literals),
``tierset=<VARIANTS name>`` and ``info=<methods_rdr.INFO name>``. Prints, per spec, the NLL over each ``window``-token slice of the scored targets and
its change against ``full`` (percent), a paired bootstrap interval of the first window's change, the tokens per tier
and the bytes; writes the rows (per-token NLL included) as JSON to ``--out``.

A screening tool: the numbers it prints are the harness's continuation NLL for the first window only; the
committed rows come from :mod:`benchmarks.quality.run` (which also scores retrieval).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


METHOD_FIELDS = ("tierset", "info")            # overrides of the RDR method itself (strings), not of its config


def parse_spec(spec: str):
    """``(method name, RetentionConfig overrides, method overrides)``; the method overrides are the keys of
    ``METHOD_FIELDS`` (``tierset=<VARIANTS name>``, ``info=<methods_rdr.INFO name>``)."""
    name, _, rest = spec.partition(":")
    over, method_over = {}, {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if not _:
            raise ValueError(f"override {item!r} of spec {spec!r} must be key=value")
        if k in METHOD_FIELDS:
            method_over[k] = v
        else:
            over[k] = ast.literal_eval(v)
    return name, over, method_over


def build_method(spec: str):
    from . import methods_rdr
    from .run import load_methods

    registry = load_methods()
    name, over, method_over = parse_spec(spec)
    if name not in registry:
        raise SystemExit(f"unknown method {name!r}; registered: {sorted(registry)}")
    method = registry[name].factory()
    if over or method_over:
        if not isinstance(method, methods_rdr.RDR):
            raise SystemExit(f"overrides need an RDR method, {name!r} is {type(method).__name__}")
        from sphkv.retention import RetentionConfig

        base = method.config or (methods_rdr.ROBUST if method.variant == "ada+rdr" else RetentionConfig())
        method.config = dataclasses.replace(base, **over)
        for k, v in method_over.items():
            setattr(method, k, v)
        method.__post_init__()
    return method


def prefill(model, tok, corpus: str, ctx_len: int, score_len: int, retrieval: bool = False):
    from .run import corpus_ids
    from .tasks import ContextTask

    ids = corpus_ids(tok, corpus, ctx_len + score_len + 1)
    # the harness's task: the continuation prefill, and with ``retrieval`` the 24 haystacks
    return ContextTask(model, tok, ids, ctx_len, score_len=score_len, retrieval=retrieval)


@torch.no_grad()
def token_nll(task, method) -> tuple[torch.Tensor, object]:
    prefix = method.build(task.ctx)
    cont = task.ids[task.n:]
    logits, _ = task._forward(prefix, cont[:-1])
    return F.cross_entropy(logits, cont[1:], reduction="none"), prefix


def needle_mask(task, before: int = 12) -> torch.Tensor:
    """``[N]`` bool, diagnosis only: in the haystack, every run of an answer value's tokens and the ``before``
    tokens ahead of it (the needle sentence's key words), found by searching the value's token ids."""
    hay = task.haystacks[0][0]
    ids, n = hay.ids.tolist(), hay.ids.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    for q in hay.questions:
        for a, b in q.spans:
            val = q.answer[a:b].tolist()
            for i in range(n - len(val) + 1):
                if ids[i:i + len(val)] == val:
                    mask[max(0, i - before):i + len(val) + 1] = True
    return mask


def bootstrap(delta: torch.Tensor, ref: float, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of ``100 · mean(delta) / ref`` over tokens resampled with replacement."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, delta.numel(), (reps, delta.numel()), generator=g)
    m = delta[idx].mean(1) * 100.0 / ref
    return float(m.quantile(0.025)), float(m.quantile(0.975))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", default="essays")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--score-len", type=int, default=256)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--spec", action="append", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--retrieval", action="store_true", help="also score the 24 retrieval cases (as the harness)")
    ap.add_argument("--needles", action="store_true",
                    help="diagnosis (with --retrieval): report the fraction of needle tokens the haystack's plan keeps; "
                         "a spec 'oracle:<spec>' gives the allocator the needle positions as its information "
                         "score (an upper bound at the budget: NOT query-agnostic, never a method)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .models import load_model
    from .run import load_methods

    model, tok = load_model(args.model)
    t0 = time.time()
    task = prefill(model, tok, args.corpus, args.context, args.score_len, args.retrieval)
    ref_tok, _ = token_nll(task, load_methods()["full"].factory())
    w = args.window
    wins = [(a, min(a + w, args.score_len)) for a in range(0, args.score_len, w)]
    refs = [float(ref_tok[a:b].mean()) for a, b in wins]
    print(f"[sweep] {args.model}/{args.corpus}/{args.context}: prefill + full {time.time() - t0:.0f}s, full NLL per "
          f"window {', '.join(f'{r:.4f}' for r in refs)}", flush=True)
    rows = [{"spec": "full", "token_nll": ref_tok.tolist(), "window_nll": refs}]
    mask = needle_mask(task) if args.needles and args.retrieval else None
    for spec in args.spec:
        t1 = time.time()
        oracle = spec.startswith("oracle:")
        method = build_method(spec.removeprefix("oracle:"))
        hits = kept = None
        if args.retrieval:
            hay, hctx = task.haystacks[0]
            if oracle:
                if mask is None:
                    raise SystemExit("an oracle: spec needs --retrieval --needles")
                method.info = "surprisal"        # the oracle's score rides in the surprisal slot of the haystack
                score = 1.0 + 49.0 * mask.float()
                task.haystacks = [(hay, dataclasses.replace(hctx, surprisal=lambda: score))]
            res = task.run(method)
            task.haystacks = [(hay, hctx)]
            hits = sum(sum(h) for h in res.hits.values())
            if mask is not None and getattr(method, "last", None) is not None:
                plan = method.last.plan.kept()                                   # the haystack's plan
                kept = [float(plan[..., mask[-plan.shape[-1]:]].float().mean()), float(plan.float().mean())]
        if oracle:
            rows.append({"spec": spec, "retrieval_hits": hits, "needle_kept": kept})
            print(f"[sweep] {spec:48s} retrieval {hits}  needle/all kept {kept}", flush=True)
            if args.out:
                args.out.write_text(json.dumps(rows) + "\n")
            continue
        nll, prefix = token_nll(task, method)
        d = nll - ref_tok
        pct = [100.0 * float(d[a:b].mean()) / r for (a, b), r in zip(wins, refs)]
        lo, hi = bootstrap(d[wins[0][0]:wins[0][1]], refs[0])
        extra = method.extra_row() if hasattr(method, "extra_row") else {}
        row = {"spec": spec, "bits_per_element": prefix.bits_per_element, "window_delta_pct": pct,
               "ci95_first": [lo, hi], "retrieval_hits": hits, "needle_kept": kept, "token_nll": nll.tolist(),
               "seconds": round(time.time() - t1, 1),
               **{k: extra.get(k) for k in ("tokens_per_tier", "dropped_tokens", "plan_source")}}
        rows.append(row)
        tpt = extra.get("tokens_per_tier") or {}
        print(f"[sweep] {spec:48s} bits {prefix.bits_per_element:.3f}  ΔNLL% "
              + " ".join(f"{p:+.3f}" for p in pct) + f"  (95% [{lo:+.2f}, {hi:+.2f}])  dropped "
              f"{extra.get('dropped_tokens')}  retrieval {hits}  needle/all kept {kept}  tiers {tpt}  {row['seconds']}s", flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows) + "\n")


if __name__ == "__main__":
    main()
