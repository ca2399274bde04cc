# SPDX-License-Identifier: Apache-2.0
"""Bound-budget serving run: radix-node retention ``heuristic`` vs ``rdr`` on real SGLang servers.

``python -m benchmarks.serving.retention [--quick]`` (in ``make serving-quick``). A dense reference
server (a pool large enough to keep everything) and one sphkv server per retention policy, each with
the same small KV budget (``budget`` bytes, so demotion and eviction decide what stays), run the same
multi-turn chat workload side by side:

* ``conversations`` chats of ``turns`` turns sharing one ``system_tokens`` system prompt (essay text),
  essay passages of ``user_tokens`` as user turns, interleaved turn-major with ``concurrency`` requests
  in flight; every history carries fixed assistant turns (:func:`ack`), so all modes send the same
  prompts and the numbers compare like for like;
* ``answer_agreement``: fraction of greedy answers identical to the dense server's
  (``answer_token_agreement``: mean fraction of leading answer tokens equal to dense's);
* ``prefix_hit_rate``: cached prompt tokens / prompt tokens over the workload (SGLang's cache report);
* ``cont_logprob_mean``: after the workload, for each conversation, the mean log-probability of the next
  ``continuation_tokens`` tokens of essay text appended to its last prompt and fixed assistant turn, read
  through whatever the cache kept of that history (``cont_cached_tokens`` of ``cont_prompt_tokens`` were served from it);
  ``cont_logprob_dense`` the dense server's value on the same inputs.

Records are keyed by ``mode`` (``sphkv-heuristic``, ``sphkv-rdr``) and read-modify-written into
``benchmarks/results/serving-quick.json`` (quick) or ``serving.json``, leaving other modes' rows alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from sphkv_sglang.server_process import ServerProcess

from .run import RESULTS, ROOT, _post, merge_records

MODEL = Path(os.environ.get("SPHKV_MODEL", ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"))
POLICIES = ("heuristic", "rdr")

__all__ = ["RetentionWorkload", "QUICK", "FULL", "run", "main", "paired_delta"]


@dataclass(frozen=True)
class RetentionWorkload:
    """Sizes of the bound-budget run (all > 0; ``budget`` in bytes must exceed the staging pages)."""

    conversations: int = 6
    turns: int = 4
    system_tokens: int = 512
    user_tokens: int = 192
    answer_tokens: int = 12
    continuation_tokens: int = 48
    concurrency: int = 2
    budget: int = 64 << 20
    max_running_requests: int = 2
    preset: str = "sphkv-4"
    dense_tokens: int = 16384

    def __post_init__(self):
        for name, v in asdict(self).items():
            if name != "preset" and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name}={v!r} must be an int > 0")


# 14 MiB on SmolLM2-135M: 4 dense staging pages (5.6 MiB), then ~1.7K logical tokens of which the
# sphkv-4 tier holds ~1K; the workload's ~2.1K distinct tokens (plus the continuation probes) overflow
# the top tier (demotion) and the pool (eviction), so retention decides. 96 continuation tokens per
# conversation: the paired rdr - heuristic difference gets an interval narrow enough to read.
QUICK = RetentionWorkload(conversations=4, turns=3, system_tokens=256, user_tokens=128, answer_tokens=6,
                          continuation_tokens=96, budget=14 << 20)
FULL = RetentionWorkload()


def build_inputs(w: RetentionWorkload, model: Path):
    from transformers import AutoTokenizer

    from sphkv_hf.data import load_essays

    tok = AutoTokenizer.from_pretrained(model)
    need = w.system_tokens + w.conversations * (w.turns * w.user_tokens + w.continuation_tokens) + 10
    ids = tok(load_essays(), add_special_tokens=False)["input_ids"][:need]
    system = "You are a careful reading assistant. Answer in one short sentence. Notes:\n" + \
        tok.decode(ids[:w.system_tokens])
    off = w.system_tokens
    users, conts = [], []
    for c in range(w.conversations):
        users.append([f"Passage {c}.{t}: " + tok.decode(ids[off + t * w.user_tokens: off + (t + 1) * w.user_tokens])
                      + "\nWhat is the main point?" for t in range(w.turns)])
        off += w.turns * w.user_tokens
        conts.append(ids[off:off + w.continuation_tokens])
        off += w.continuation_tokens
    return tok, system, users, conts


def ack(c: int, t: int) -> str:
    """The fixed assistant turn every mode's history carries for conversation ``c``, turn ``t``."""
    return f"I have read passage {c}.{t} and will keep it in mind."


def chat(url: str, tok, system: str, users, w: RetentionWorkload) -> dict:
    """The multi-turn workload. Histories carry fixed assistant turns (:func:`ack`), so every mode sends
    the same prompts whatever it answers; the greedy answers are returned for comparison."""
    requests.post(url + "/flush_cache", timeout=60)
    conv = len(users)
    answers = [[None] * w.turns for _ in range(conv)]
    recs = []

    def prompt_ids(c: int, t: int) -> list[int]:
        msgs = [{"role": "system", "content": system}]
        for s in range(t):
            msgs += [{"role": "user", "content": users[c][s]}, {"role": "assistant", "content": ack(c, s)}]
        msgs.append({"role": "user", "content": users[c][t]})
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    def one(c: int, t: int) -> dict:
        ids = list(prompt_ids(c, t))
        out = _post(url, timeout=1800, payload={"input_ids": ids, "sampling_params": {"max_new_tokens": w.answer_tokens,
                                                                "temperature": 0, "ignore_eos": True}})
        answers[c][t] = out["output_ids"]
        m = out["meta_info"]
        return {"prompt_tokens": m["prompt_tokens"], "cached_tokens": m["cached_tokens"]}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(w.concurrency) as ex:
        for t in range(w.turns):
            recs += list(ex.map(lambda c: one(c, t), range(conv)))
    prompt = sum(r["prompt_tokens"] for r in recs)
    cached = sum(r["cached_tokens"] for r in recs)
    return {"answers": answers, "requests": len(recs), "prompt_tokens": prompt, "cached_tokens": cached,
            "prefix_hit_rate": cached / max(prompt, 1), "workload_wall_s": time.perf_counter() - t0,
            "history_ids": [prompt_ids(c, w.turns - 1) for c in range(conv)]}


def continuation(url: str, prefixes: list[list[int]], conts: list[list[int]]) -> dict:
    """Mean logprob of each conversation's continuation tokens ``conts[c]`` after ``prefixes[c]``."""
    lps, per_token, cached, prompt = [], [], 0, 0
    for prefix, cont in zip(prefixes, conts):
        out = _post(url, timeout=1800, payload={"input_ids": list(prefix) + list(cont), "return_logprob": True,
                          "logprob_start_len": len(prefix), "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
        vals = [x[0] for x in out["meta_info"]["input_token_logprobs"] if x[0] is not None][-len(cont):]
        lps.append(statistics.fmean(vals))
        per_token.append(vals)
        cached += out["meta_info"]["cached_tokens"]
        prompt += len(prefix) + len(cont)
    return {"cont_logprob_mean": statistics.fmean(lps), "cont_logprob_per_conv": lps,
            "cont_token_logprobs": per_token, "cont_cached_tokens": cached, "cont_prompt_tokens": prompt}


def paired_delta(a: list[list[float]], b: list[list[float]], *, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean per-token logprob difference ``a - b`` over the same continuation tokens (conversation by
    conversation), with a 95% bootstrap interval that resamples whole conversations (tokens of one
    conversation are not independent). ``a``, ``b``: per conversation, the continuation tokens' logprobs.

    >>> d = paired_delta([[-1.0, -2.0], [-3.0]], [[-1.5, -2.0], [-3.5]])
    >>> round(d["mean"], 4), d["tokens"], d["conversations"]
    (0.3333, 3, 2)
    """
    import random

    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("paired_delta needs the same conversations and continuation tokens on both sides")
    diffs = [[x - y for x, y in zip(xa, xb)] for xa, xb in zip(a, b)]

    def mean_of(convs):
        n = sum(len(c) for c in convs)
        return sum(sum(c) for c in convs) / max(n, 1)

    rng = random.Random(seed)
    boot = sorted(mean_of([diffs[rng.randrange(len(diffs))] for _ in diffs]) for _ in range(resamples))
    return {"mean": mean_of(diffs), "ci95": [boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]],
            "tokens": sum(len(c) for c in diffs), "conversations": len(diffs),
            "per_conv": [statistics.fmean(c) if c else 0.0 for c in diffs]}


def _agreement(answers, reference) -> dict:
    same, frac = [], []
    for a_row, r_row in zip(answers, reference):
        for a, r in zip(a_row, r_row):
            same.append(list(a) == list(r))
            k = 0
            while k < min(len(a), len(r)) and a[k] == r[k]:
                k += 1
            frac.append(k / max(len(r), 1))
    return {"answer_agreement": sum(same) / len(same), "answer_token_agreement": statistics.fmean(frac)}


def _sphkv_state(url: str) -> dict:
    state = requests.get(url + "/get_server_info", timeout=60).json()["internal_states"][0]
    return {"max_total_num_tokens": state["memory_usage"]["token_capacity"], "sphkv": state.get("sphkv") or {}}


def _serve(mode: str, w: RetentionWorkload, model: Path, logdir: Path, inputs) -> dict:
    """Start the server of ``mode`` (``dense`` or a retention policy), run the workload and the probes."""
    tok, system, users, conts = inputs
    common = ["--max-running-requests", str(w.max_running_requests), "--enable-cache-report",
              "--watchdog-timeout", "3600"]
    if mode == "dense":
        srv = ServerProcess(model, sphkv=False, args=["--max-total-tokens", str(w.dense_tokens), *common],
                            log_path=logdir / "retention-dense.log")
    else:
        srv = ServerProcess(model, args=["--sphkv-preset", w.preset, "--sphkv-budget", str(w.budget),
                                         "--sphkv-config", json.dumps({"retention": mode}), *common],
                            log_path=logdir / f"retention-{mode}.log")
    with srv:
        start = _sphkv_state(srv.url)
        res = chat(srv.url, tok, system, users, w)
        prefixes = [list(h) + tok(ack(c, w.turns - 1), add_special_tokens=False)["input_ids"]
                    for c, h in enumerate(res["history_ids"])]
        res.update(continuation(srv.url, prefixes, conts))
        res["state"] = _sphkv_state(srv.url)
        res["start_s"] = srv.start_seconds
        res["max_total_num_tokens"] = start["max_total_num_tokens"]
    print(f"[{mode}] done: hit rate {res['prefix_hit_rate']:.3f}, cont logprob {res['cont_logprob_mean']:.4f}",
          flush=True)
    return res


def run(w: RetentionWorkload, model: Path, logdir: Path, policies=POLICIES, out: Path | None = None) -> list[dict]:
    """The dense reference and one bound-budget sphkv server per policy, side by side (every mode sends
    the same prompts, so none waits for another); returns one record per policy, merged into ``out``."""
    inputs = build_inputs(w, model)
    modes = ["dense", *policies]
    with ThreadPoolExecutor(len(modes)) as ex:
        futs = {m: ex.submit(_serve, m, w, model, logdir, inputs) for m in modes}
        res = {m: f.result() for m, f in futs.items()}
    ref = res["dense"]
    records = []
    for pol in policies:
        r = res[pol]
        st = r["state"]["sphkv"]
        rec = {"mode": f"sphkv-{pol}", "retention": pol, "kv_budget_bytes": w.budget,
               "max_total_num_tokens": r["max_total_num_tokens"], "start_s": r["start_s"],
               **{k: v for k, v in r.items() if k not in ("answers", "history_ids", "state", "start_s",
                                                          "max_total_num_tokens", "cont_token_logprobs")},
               **_agreement(r["answers"], ref["answers"]),
               "cont_logprob_dense": ref["cont_logprob_mean"], "dense_prefix_hit_rate": ref["prefix_hit_rate"],
               "pages_demoted": st.get("pages_demoted"), "demoted_nodes": st.get("demoted_nodes"),
               "evicted_tokens": st.get("evicted_tokens"), "bytes_per_tier": st.get("bytes_per_tier"),
               "tiers": st.get("tiers"), "rdr_plans": st.get("rdr_plans"),
               "rdr_exact_wins": st.get("rdr_exact_wins"), "rdr_uniform_wins": st.get("rdr_uniform_wins"),
               "cont_logprob_delta_vs_dense": paired_delta(r["cont_token_logprobs"], ref["cont_token_logprobs"]),
               "workload": asdict(w), "loadavg_1min": os.getloadavg()[0]}
        if pol != "heuristic" and "heuristic" in res:   # the comparison the issue asks for, paired per token
            rec["cont_logprob_delta_vs_heuristic"] = paired_delta(r["cont_token_logprobs"],
                                                                  res["heuristic"]["cont_token_logprobs"])
        print(f"[{rec['mode']}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in rec.items() if k not in ("workload", "cont_logprob_per_conv")
                                               and not k.startswith("cont_logprob_delta")),
              flush=True)
        for key in ("cont_logprob_delta_vs_dense", "cont_logprob_delta_vs_heuristic"):
            if key in rec:
                d = rec[key]
                print(f"[{rec['mode']}] {key}: {d['mean']:+.4f} nats/token, 95% CI [{d['ci95'][0]:+.4f}, "
                      f"{d['ci95'][1]:+.4f}] over {d['tokens']} tokens of {d['conversations']} conversations", flush=True)
        records.append(rec)
    if out is not None:
        merge_records(out, records)
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small workload for the shared 2-core machine: 104 s for the three servers side by side "
                         "(2026-12-02, load 1.8-5.1 with its own servers)")
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (read-modify-written by mode)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = ap.parse_args(argv)
    w = QUICK if args.quick else FULL
    for item in args.set:
        key, _, val = item.partition("=")
        if key not in asdict(w):
            raise SystemExit(f"--set {item!r}: unknown field; allowed: {sorted(asdict(w))}")
        w = RetentionWorkload(**{**asdict(w), key: type(getattr(w, key))(val)})
    out = args.out or RESULTS / ("serving-quick.json" if args.quick else "serving.json")
    logdir = out.parent / (out.stem + "-logs")
    logdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = run(w, args.model, logdir, tuple(args.policies.split(",")), out=out)
    print(f"wrote {len(records)} rows into {out} in {time.perf_counter() - t0:.0f} s")
    return records


if __name__ == "__main__":
    main()
