# SPDX-License-Identifier: Apache-2.0
"""Retrieval heads of a model, measured on the calibration corpus: the head table the ``sphkv-rh`` presets read.

``python -m benchmarks.quality.heads MODEL [MODEL...] [--contexts 2048 4096] [--out PATH]``

For each context length the harness's own needle haystack is built from the **essays** (the calibration corpus;
the Python docs are never read here): the same tokens and needles as ``run.py`` (:func:`build_suite`). The
haystack is prefilled once with the model's own attention (full float32 K/V, no coding); then every question of
the suite (single, multi-key, multi-value: 24 values) is teacher-forced with its answer through the model's eager
attention, and for each answer token the attention probability that each query head puts on the tokens of that
value inside its needle is read. A (layer, kv head)'s score is the mean over values and answer tokens of the
largest such mass among its query heads (a retrieval head is one query head; coding its kv head moves all of its
group), averaged over the context lengths. No question of the scored runs is involved in a compression: the table
is fixed per model before any of them, and the pydocs rows are a held-out check.

Writes ``{model: {"model_type", "num_layers", "num_kv_heads", "scores": [L][Hkv], "order": [[layer, head], ...] (best first), "contexts", "corpus",
"values_found", "values_total"}}`` into ``--out`` (default :data:`TABLE`, merged with what is there).
Deterministic: same tokens, same needles, float32 math, one thread.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

__all__ = ["TABLE", "CORPUS", "value_positions", "needle_attention", "head_scores", "load_table", "head_order"]

TABLE = Path(__file__).resolve().parent / "retrieval_heads.json"
CORPUS = "essays"


def value_positions(hay_ids: torch.Tensor, value: torch.Tensor, depth: float, *, slack: int = 48) -> torch.Tensor:
    """Positions ``[len(value)]`` int64 of the value's tokens inside its needle: the first occurrence of ``value``
    ``[m]`` in ``hay_ids`` ``[N]`` at or after ``round(depth * N) - 2`` and within ``slack`` tokens of it.
    Raises ``ValueError`` naming the depth when the value is not there."""
    n, m = hay_ids.numel(), value.numel()
    start = max(0, round(depth * n) - 2)
    for i in range(start, min(n - m, start + slack) + 1):
        if torch.equal(hay_ids[i:i + m], value):
            return torch.arange(i, i + m)
    raise ValueError(f"value tokens {value.tolist()} not found near depth {depth:.3f} (position {start}..{start + slack})")


@torch.no_grad()
def needle_attention(model, hay_ids: torch.Tensor, questions) -> tuple[torch.Tensor, int, int]:
    """Per value of ``questions``: ``[Q, L, Hq]`` float64 — mean over the value's answer tokens of the attention
    probability each query head puts on the value's tokens in the needle (model's eager attention, after a
    prefill of ``hay_ids`` ``[N]`` with its SDPA attention). Returns (that, values found, values asked)."""
    from transformers import DynamicCache

    n = hay_ids.numel()
    own = model.config._attn_implementation
    rows, found, total = [], 0, 0
    try:
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
        model(input_ids=hay_ids[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        model.set_attn_implementation("eager")
        for q in questions:
            qa = torch.cat([q.question, q.answer])
            c = _copy_cache(cache)
            pos = torch.arange(n, n + qa.numel())[None]
            out = model(input_ids=qa[None], position_ids=pos, past_key_values=c, use_cache=True,
                        output_attentions=True, logits_to_keep=1)
            for (a, b), depth in zip(q.spans, q.depths):
                total += 1
                try:
                    where = value_positions(hay_ids, q.answer[a:b], depth)
                except ValueError:
                    continue
                found += 1
                r0 = q.question.numel() - 1                              # row predicting answer token 0
                per_layer = []
                for att in out.attentions:                               # [1, Hq, W, kept + W]
                    kept = att.shape[-1] - qa.numel()                    # haystack keys this layer still holds
                    idx = where - (n - kept)
                    idx = idx[idx >= 0]
                    rows_ab = att[0, :, r0 + a: r0 + b]                  # [Hq, b - a, keys]
                    per_layer.append(rows_ab[..., idx].sum(-1).mean(-1).double() if idx.numel()
                                     else torch.zeros(att.shape[1], dtype=torch.float64))
                rows.append(torch.stack(per_layer))
    finally:
        model.set_attn_implementation(own)
    return torch.stack(rows), found, total


def _copy_cache(cache):
    import copy

    return copy.deepcopy(cache)


def head_scores(mass: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[Q, L, Hq]`` needle attention → ``[L, Hkv]`` score: per value the largest mass among a kv head's query
    heads (GQA groups of consecutive query heads), then the mean over values."""
    q, layers, hq = mass.shape
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of num_kv_heads={num_kv_heads}")
    return mass.view(q, layers, num_kv_heads, hq // num_kv_heads).amax(-1).mean(0)


def head_order(scores: torch.Tensor) -> list[tuple[int, int]]:
    """``[L, Hkv]`` scores → (layer, head) pairs, highest score first (ties: lower layer, then head, first)."""
    flat = scores.flatten()
    idx = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    return [(i // scores.shape[1], i % scores.shape[1]) for i in idx]


def load_table(model_config, path: Path = TABLE) -> dict:
    """The stored table of the model with ``model_config`` (matched on ``model_type``, layers and kv heads);
    raises ``ValueError`` naming the model and the command that makes a table."""
    data = json.loads(path.read_text()) if path.exists() else {}
    key = (model_config.model_type, model_config.num_hidden_layers, model_config.num_key_value_heads)
    for entry in data.values():
        if (entry.get("model_type"), entry.get("num_layers"), entry.get("num_kv_heads")) == key:
            return entry
    raise ValueError(f"no retrieval-head table for (model_type, layers, kv heads) {key} in {path}; have "
                     f"{sorted(data)}. Make one with: python -m benchmarks.quality.heads MODEL")


def measure(model_name: str, contexts: list[int]) -> dict:
    from .models import load_model
    from .retrieval import build_suite
    from .run import corpus_ids

    model, tok = load_model(model_name)
    hkv = model.config.num_key_value_heads
    per_ctx, found, total = [], 0, 0
    for n in contexts:
        t0 = time.time()
        base = corpus_ids(tok, CORPUS, n + 256 + 1)[:n]                  # the harness's context (score_len 256)
        (hay,) = build_suite(tok, base)
        mass, f, t = needle_attention(model, hay.ids, hay.questions)
        per_ctx.append(head_scores(mass, hkv))
        found, total = found + f, total + t
        print(f"{model_name} {CORPUS} {n}: {f}/{t} values located, {time.time() - t0:.0f}s", flush=True)
    scores = torch.stack(per_ctx).mean(0)
    cfg = model.config
    return {"model_type": cfg.model_type, "num_layers": cfg.num_hidden_layers, "num_kv_heads": hkv,
            "corpus": CORPUS, "contexts": contexts, "values_found": found, "values_total": total,
            "scores": [[round(float(x), 6) for x in row] for row in scores],
            "order": [list(p) for p in head_order(scores)]}


def main(argv: list[str] | None = None) -> None:
    from .models import MODELS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", choices=sorted(MODELS))
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--out", type=Path, default=TABLE)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    for m in args.models:
        data[m] = measure(m, args.contexts)
        top = data[m]["order"][:8]
        print(f"{m}: top heads {top} scores {[data[m]['scores'][l][h] for l, h in top]}", flush=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
