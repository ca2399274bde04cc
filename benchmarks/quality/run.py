# SPDX-License-Identifier: Apache-2.0
"""Quality harness: real models (float32 weights, bf16 prefilled cache, float32 attention) on two real corpora.

``python -m benchmarks.quality.run [--quick | --smoke] [--models ...] [--corpora ...] [--contexts 2048 4096]
[--methods ...]``

* ``--quick`` (``make quality-quick``): every (model, corpus) pair at contexts 2K and 4K, the methods
  registered ``quick=True``; writes ``benchmarks/results/quality-quick.json`` (+ ``.md`` and one
  rate-distortion plot per corpus, ``quality-quick-rd-<corpus>.png``).
* default (``make quality``): every registered method, contexts 2K and 4K (add 8192 with
  ``--contexts``), 512 scored tokens (``--score-len``); writes ``quality.json``, ``quality.md`` and
  ``rate_distortion.png``.
* ``--smoke``: SmolLM2 on the essays, a 1024-token context, 32 scored tokens, four methods (for the tests).

Models (:mod:`benchmarks.quality.models`) and corpora (:mod:`benchmarks.quality.corpora`: ``essays``,
the tuning corpus, and ``pydocs``, never tuned on). Rows: one per (model, corpus, method, context) with
``model``, ``corpus``, ``method``, ``group``, ``bits_per_element``, ``context``,
``nll``, ``nll_delta_pct``, ``retrieval_rate`` (24 RULER-style cases, :mod:`benchmarks.quality.retrieval`),
``retrieval_by_task``, ``needle_hit_rate`` and ``needle_hits`` (the 8 single-needle cases by depth),
``answer_nll`` (their mean summed answer NLL, nats), ``answer_nll_per_depth``, ``logit_rel_err``, ``kl``,
``layer_attn_rel_err``, ``budget_fraction`` and ``seconds`` (the ``full`` row also ``model_nll``, the
model's own SDPA attention on the same tokens without a cache, and ``model_nll_delta_pct``), plus whatever a method's optional
``extra_row()`` returns (e.g. RDR's ``metadata_overhead_pct``). See :mod:`benchmarks.quality.tasks`.
Methods are registered in :mod:`benchmarks.quality.methods` (interface documented there).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
SMOKE_METHODS = ["full", "sphkv-4", "kivi-4", "snapkv@0.10"]


def load_methods() -> dict:
    """Import the built-in method modules and every ``methods_*.py`` plug-in of this package."""
    from . import ada, eviction, quantizers  # noqa: F401  (registration on import)
    from .methods import REGISTRY

    pkg = Path(__file__).resolve().parent
    for info in pkgutil.iter_modules([str(pkg)]):
        if info.name.startswith("methods_"):
            importlib.import_module(f"{__package__}.{info.name}")
    return REGISTRY


def corpus_ids(tok, corpus: str, num_tokens: int):
    import torch

    from .corpora import load_corpus

    text = load_corpus(corpus)
    ids = tok(text[: num_tokens * 8], add_special_tokens=False).input_ids
    if len(ids) < num_tokens:
        raise ValueError(f"corpus {corpus!r} has {len(ids)} tokens, need {num_tokens}")
    return torch.tensor(ids[:num_tokens])


def essay_ids(tok, num_tokens: int):
    """The first ``num_tokens`` tokens of the essays (the tuning corpus)."""
    return corpus_ids(tok, "essays", num_tokens)


def _row(name, entry, method, ctx_len, res, ref, secs, model_name, corpus) -> dict:
    from .tasks import fidelity

    every = [h for hs in res.hits.values() for h in hs]
    return {"model": model_name, "corpus": corpus,
            "method": name, "group": entry.group, "bits_per_element": res.bits_per_element, "context": ctx_len,
            "score_len": res.logits.shape[0], "nll": res.nll,
            "nll_delta_pct": 100.0 * (res.nll - ref.nll) / ref.nll,
            "retrieval_rate": sum(every) / len(every), "retrieval_cases": len(every),
            "retrieval_by_task": {t: sum(h) / len(h) for t, h in res.hits.items() if h},
            "needle_hit_rate": sum(res.needle_hits) / len(res.needle_hits), "needle_hits": res.needle_hits,
            "answer_nll": sum(res.answer_nll) / len(res.answer_nll), "answer_nll_per_depth": res.answer_nll,
            "answer_margin_per_depth": res.answer_margin,
            **fidelity(ref, res), "budget_fraction": method.budget_fraction, "seconds": round(secs, 1),
            **(method.extra_row() if hasattr(method, "extra_row") else {})}


def run(contexts: list[int], names: list[str], *, score_len: int, out_json: Path, models: list[str],
        corpora: list[str], progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    from .models import load_model
    from .tasks import ContextTask

    registry = load_methods()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; registered: {sorted(registry)}")
    rows: list[dict] = []
    bar = tqdm(total=len(models) * len(corpora) * len(contexts) * len(names), desc="quality", unit="run",
               disable=not progress)
    for model_name in models:
        model, tok = load_model(model_name)
        for corpus in corpora:
            ids = corpus_ids(tok, corpus, max(contexts) + score_len + 1)
            for ctx_len in contexts:
                t0 = time.time()
                bar.set_postfix_str(f"prefill {model_name}/{corpus}/{ctx_len}")
                task = ContextTask(model, tok, ids, ctx_len, score_len=score_len)
                ref = task.run(registry["full"].factory())
                own = task.model_nll()
                bar.write(f"[quality] {model_name} / {corpus} / {ctx_len}: prefills + full cache "
                          f"{time.time() - t0:.0f}s, nll {ref.nll:.4f}, retrieval "
                          f"{sum(sum(h) for h in ref.hits.values())}/{sum(len(h) for h in ref.hits.values())}")
                for name in names:
                    bar.set_postfix_str(f"{name} @ {model_name}/{corpus}/{ctx_len}")
                    t1 = time.time()
                    method = registry[name].factory()
                    res = ref if name == "full" else task.run(method)
                    rows.append(_row(name, registry[name], method, ctx_len, res, ref, time.time() - t1,
                                     model_name, corpus))
                    if name == "full":      # the model's own attention (SDPA, float32 K/V, no cache)
                        rows[-1].update(model_nll=own, model_nll_delta_pct=100.0 * (ref.nll - own) / own)
                    out_json.write_text(json.dumps(rows, indent=1) + "\n")
                    bar.update()
                del task
        del model
    bar.close()
    return rows


def fill_model_nll(path: Path, *, threads: int = 1) -> list[dict]:
    """Set ``model_nll`` / ``model_nll_delta_pct`` on the ``full`` rows of ``path`` that lack them: the same
    tokens :class:`~benchmarks.quality.tasks.ContextTask` scores (the corpus's first ``context + score_len + 1``
    tokens), through :func:`~benchmarks.quality.tasks.own_nll`. Rows of models not installed here are left."""
    import torch

    from .models import available_models, load_model
    from .tasks import own_nll

    torch.set_num_threads(threads)
    rows = json.loads(path.read_text())
    todo = [r for r in rows if r["method"] == "full" and r.get("model_nll") is None]
    for name in sorted({r["model"] for r in todo} & set(available_models())):
        model, tok = load_model(name)
        for r in (r for r in todo if r["model"] == name):
            ids = corpus_ids(tok, r["corpus"], r["context"] + r["score_len"] + 1)
            own = own_nll(model, ids, r["context"])
            r.update(model_nll=own, model_nll_delta_pct=100.0 * (r["nll"] - own) / own)
            print(f"[quality] {name} / {r['corpus']} / {r['context']}: full {r['nll']:.6f}, model's own {own:.6f} "
                  f"({r['model_nll_delta_pct']:+.4f}%)", flush=True)
        del model
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


MERGE_KEY = ("model", "corpus", "context", "method")
HEAD_GROUP = "sphkv-rh"          # methods_heads.py: each preset of the group checked on its own


def merge_rows(files: list[list[dict]]) -> list[dict]:
    """Rows of several result files, one per (model, corpus, context, method): a later file's row replaces
    an earlier one in place (order of first appearance kept); a row without one of the key fields raises."""
    merged: dict[tuple, dict] = {}
    for i, rows in enumerate(files):
        for row in rows:
            missing = [k for k in MERGE_KEY if k not in row]
            if missing:
                raise ValueError(f"merge input {i}: row {row.get('method', '?')!r} lacks key fields {missing}")
            merged[tuple(row[k] for k in MERGE_KEY)] = row
    return list(merged.values())


def write_reports(rows: list[dict], out_json: Path, stem: str, corpora: list[str], *, plots: bool) -> None:
    """``<out>.md`` (table, RDR checks, preset targets) and ``<stem>-rd-<corpus>.png`` per corpus."""
    from .report import markdown_table, rate_distortion_plot, rdr_check, target_check

    text = markdown_table(rows) + "\n" + rdr_check(rows) + "\n" + target_check(rows)
    for m in sorted({r["method"] for r in rows if r.get("group") == HEAD_GROUP}):     # each head-tiered preset
        text += f"\n`{m}`: " + target_check([r for r in rows if r.get("group") != HEAD_GROUP or r["method"] == m],
                                            group=HEAD_GROUP)
    out_json.with_suffix(".md").write_text(text)
    if plots:
        for corpus in corpora:
            rate_distortion_plot([r for r in rows if r["corpus"] == corpus],
                                 out_json.parent / f"{stem}-rd-{corpus}.png")
    print(text)


def main(argv: list[str] | None = None) -> None:
    from .corpora import CORPORA
    from .models import MODELS, available_models

    ap = argparse.ArgumentParser(description="KV-compression quality on real models and corpora")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2K+4K, quick methods (< 10 min)")
    mode.add_argument("--smoke", action="store_true", help="tiny context, four methods (tests)")
    ap.add_argument("--contexts", type=int, nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=None, help="method names (default: by mode)")
    ap.add_argument("--score-len", type=int, default=None)
    ap.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS),
                    help="default: every model whose weights are installed")
    ap.add_argument("--corpora", nargs="+", default=None, choices=sorted(CORPORA), help="default: all")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SPHKV_THREADS", "0")),
                    help="torch threads; 0 (default): 2 on an idle machine, else 1 (2 threads collapse "
                         "when other processes compete for the two cores)")
    ap.add_argument("--out", type=Path, default=None, help="output JSON path")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="no run: combine these row files (e.g. one per corpus, run side by side) into --out "
                         "(+ .md and one rate-distortion plot per corpus); a row of a later file replaces the "
                         "row with the same (model, corpus, context, method) of an earlier one, so partial "
                         "re-runs combine with the committed file (which may itself be an input)")
    ap.add_argument("--fill-model-nll", type=Path, default=None, metavar="JSON",
                    help="no run: give every `full` row of this results file that lacks `model_nll` the model's own "
                         "NLL on the same tokens (one cache-less forward per row; rows written before the field "
                         "existed), in place")
    args = ap.parse_args(argv)
    if args.fill_model_nll:
        fill_model_nll(args.fill_model_nll, threads=args.threads or 1)
        return
    if args.merge:
        rows = merge_rows([json.loads(p.read_text()) for p in args.merge])
        out = args.out or RESULTS / "quality-quick.json"
        out.write_text(json.dumps(rows, indent=1) + "\n")
        write_reports(rows, out, out.stem, sorted({r["corpus"] for r in rows}), plots=True)
        return

    import torch

    torch.set_num_threads(args.threads or (2 if os.getloadavg()[0] < 1.0 else 1))
    registry = load_methods()
    if args.smoke:
        contexts, names, score_len, stem = [1024], SMOKE_METHODS, 32, "quality-smoke"
    elif args.quick:
        contexts, score_len, stem = [2048, 4096], 256, "quality-quick"
        names = [n for n, e in registry.items() if e.quick]
    else:                       # more scored tokens: the NLL change of a 256-token window is noisy at ±0.3%
        contexts, score_len, stem = [2048, 4096], 512, "quality"
        names = list(registry)
    contexts = args.contexts or contexts
    names = args.methods or names
    names = ["full"] + [n for n in names if n != "full"]
    score_len = args.score_len or score_len
    out_json = args.out or RESULTS / f"{stem}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models = args.models or (["smollm2"] if args.smoke else available_models())
    corpora = args.corpora or (["essays"] if args.smoke else sorted(CORPORA))
    rows = run(contexts, names, score_len=score_len, out_json=out_json, models=models, corpora=corpora,
               progress=not args.no_progress)
    write_reports(rows, out_json, out_json.stem, corpora, plots=not args.smoke)
    print(f"[quality] {len(rows)} rows in {time.time() - t0:.0f}s → {out_json}")


if __name__ == "__main__":
    main()
