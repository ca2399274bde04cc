# SPDX-License-Identifier: Apache-2.0
"""Why a needle flips: per-token answer margins of the 8 single-needle cases, for several methods on one context.

``python -m benchmarks.quality.needles MODEL CORPUS CONTEXT METHOD... [--out JSON]``

Builds the same :class:`~benchmarks.quality.tasks.ContextTask` as ``run.py`` (same tokens, same haystack), then
for ``full`` and every ``METHOD`` compresses the haystack and runs only the single-needle questions (no
continuation, no multi-key cases: ~1/3 of a ``run.py`` method). Per case: the needle depth, per answer token
the margin ``logit(answer) - max other logit`` (> 0: the token is the argmax; a case is a hit when every
margin is > 0, the harness's rule), the answer tokens and the rival argmax tokens. Prints one block per
method and writes ``{method: {"bits_per_element", "cases": [{depth, margins, answer, rival}]}}`` (plus
``bits_per_visible_element`` for a window-only head-tiered preset).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    from .models import MODELS, load_model
    from .run import corpus_ids, load_methods
    from .tasks import ContextTask

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("corpus")
    ap.add_argument("context", type=int)
    ap.add_argument("methods", nargs="+")
    ap.add_argument("--score-len", type=int, default=256, help="as run.py --quick (sets the tokens read)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    reg = load_methods()
    unknown = [m for m in args.methods if m not in reg]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; registered: {sorted(reg)}")
    model, tok = load_model(args.model)
    ids = corpus_ids(tok, args.corpus, args.context + args.score_len + 1)
    t0 = time.time()
    task = ContextTask(model, tok, ids, args.context, score_len=args.score_len)
    print(f"prefills {time.time() - t0:.0f}s", flush=True)
    out = {}
    for name in ["full"] + [m for m in args.methods if m != "full"]:
        method, t1, cases, bits, vis = reg[name].factory(), time.time(), [], None, None
        for hay, ctx in task.haystacks:
            comp = method.build(ctx)
            bits = comp.bits_per_element
            vis = (method.extra_row() if hasattr(method, "extra_row") else {}).get("bits_per_visible_element")
            for q in hay.questions:
                if q.task != "single":
                    continue
                lg, _ = task._forward(comp, torch.cat([q.question, q.answer]))
                pred = lg[q.question.numel() - 1: -1]                 # predicts the answer tokens
                other = pred.scatter(-1, q.answer[:, None], float("-inf"))
                margin = pred.gather(-1, q.answer[:, None])[:, 0] - other.amax(-1)
                a, b = q.spans[0]
                cases.append({"depth": q.depths[0], "margins": [round(float(x), 3) for x in margin[a:b]],
                              "answer": tok.convert_ids_to_tokens(q.answer[a:b].tolist()),
                              "rival": tok.convert_ids_to_tokens(other.argmax(-1)[a:b].tolist())})
        cases.sort(key=lambda c: c["depth"])
        out[name] = {"bits_per_element": bits, "cases": cases}
        if vis is not None:
            out[name]["bits_per_visible_element"] = vis
        print(f"== {name} bits {bits:.3f}" + (f" (per visible element {vis:.3f})" if vis is not None else "")
              + f" ({time.time() - t1:.0f}s) hits "
              f"{sum(min(c['margins']) > 0 for c in cases)}/{len(cases)}", flush=True)
        for c in cases:
            print(f"  depth {c['depth']:.3f} min {min(c['margins']):+6.2f} margins {c['margins']} "
                  f"answer {c['answer']} rival {c['rival']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "corpus": args.corpus, "context": args.context,
                                        "methods": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
