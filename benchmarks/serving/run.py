# SPDX-License-Identifier: Apache-2.0
"""Serving benchmark: a dense and a sphkv SGLang server given the same KV memory.

``python -m benchmarks.serving.run [--quick]`` (``make serving-quick``). For each mode it starts a
real server on 127.0.0.1 (SmolLM2-135M-Instruct; the CPU engine on a GPU-less machine), then:

1. **quality** — caches a ``context``-token essay prefix with a first request, then sends the prefix
   plus the true ``continuation`` tokens and reads their input log-probabilities (the prefix is
   served from the radix cache: coded pages on the sphkv server) → ``cont_logprob_mean``;
2. **single stream** — one request, ``stream_tokens`` new tokens → ``single_stream_tok_s``;
3. **bench_serving** — SGLang's own client (``python -m sglang.bench_serving``) on two datasets:
   ``random-ids`` (``bench_prompts`` prompts of ``bench_input_len`` random token ids,
   ``bench_output_len`` new tokens each, all sent at once) → ``bench_output_tok_s``,
   ``bench_mean_itl_ms``, ``bench_mean_ttft_ms``; ``generated-shared-prefix`` (``bench_gsp_groups``
   groups of ``bench_prompts / bench_gsp_groups`` questions sharing a ``bench_gsp_system_len``-token
   system prompt) → ``bench_prefix_output_tok_s`` (and its ITL / TTFT); ``kvbound`` — random-ids with
   ``kvbound_prompts`` prompts of ``kvbound_input_len`` tokens (``kvbound_output_len`` new tokens each, all
   in flight at once, ``--max-concurrency`` = the prompt count), sized so that the dense pool holds only a
   few requests at once while the sphkv pool, same bytes, holds ``max_running_requests`` of them →
   ``bench_kvbound_output_tok_s`` / ``_mean_itl_ms`` / ``_mean_ttft_ms`` and, from the scheduler's
   ``Decode batch, #running-req: N`` log lines (``--decode-log-interval 1``), ``bench_kvbound_running_req``
   (mean decode batch), ``_running_req_max``, ``_queue_req_max``, ``_retractions``, and the server's CPU
   seconds over the run → ``bench_kvbound_output_tok_per_server_cpu_s``. The ``random`` dataset
   needs a download and is not used;
4. **multi-turn workload** — ``conversations`` chats of ``turns`` turns sharing one
   ``system_tokens`` system prompt, essay passages as user turns, greedy answers of
   ``answer_tokens``; turns are interleaved across conversations (all first turns, then all second
   turns, ...) with ``concurrency`` requests in flight, so a conversation's history is reused only if
   the cache kept it while the other conversations ran.

The dense server gets ``--max-total-tokens dense_tokens``; the sphkv server gets
``--sphkv-budget`` = the same bytes (``dense_tokens`` × bf16 bytes per token). Results: a JSON list
of one record per mode (``mode``, ``max_total_num_tokens``, ``throughput_tok_s``,
``prefix_hit_rate``, ``cont_logprob_mean``, ...) and a PNG plot. Wall-clock throughput on a shared
machine moves with other processes' load, so each record also has the server's own CPU seconds
during the workload and tokens per server CPU-second, the 1-minute load average, and the seconds
of every phase (``phase_s``). ``--quick`` (``QUICK``): 502 s for both modes on the 2-core machine at
load 1.5-3.3 (2026-12-02; the KV-bound run ~90-100 s of it per mode).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from sphkv_sglang.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Workload:
    conversations: int = 32
    turns: int = 4
    system_tokens: int = 1536
    user_tokens: int = 384
    answer_tokens: int = 32
    concurrency: int = 8
    dense_tokens: int = 12288
    context: int = 4096
    continuation: int = 256
    stream_tokens: int = 128
    max_running_requests: int = 8
    preset: str = "sphkv-4"
    bench_prompts: int = 24
    bench_input_len: int = 512
    bench_output_len: int = 64
    bench_gsp_groups: int = 4
    bench_gsp_system_len: int = 512
    bench_gsp_question_len: int = 64
    kvbound_prompts: int = 16
    kvbound_input_len: int = 4096
    kvbound_output_len: int = 64

    def __post_init__(self):
        for name in ("conversations", "turns", "system_tokens", "user_tokens", "answer_tokens", "concurrency",
                     "dense_tokens", "context", "continuation", "stream_tokens", "max_running_requests",
                     "bench_prompts", "bench_input_len", "bench_output_len", "bench_gsp_groups",
                     "bench_gsp_system_len", "bench_gsp_question_len", "kvbound_prompts", "kvbound_input_len",
                     "kvbound_output_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.context + self.continuation + 64 > self.dense_tokens:
            raise ValueError(f"context+continuation ({self.context}+{self.continuation}) must fit dense_tokens="
                             f"{self.dense_tokens}")
        if self.kvbound_input_len + self.kvbound_output_len > self.dense_tokens:
            raise ValueError(f"kvbound_input_len+kvbound_output_len ({self.kvbound_input_len}+"
                             f"{self.kvbound_output_len}) must fit dense_tokens={self.dense_tokens}: the dense "
                             f"server could not hold even one request")


# Measured 2026-12-02 on the shared 2-core machine (load 1.5-3.3): 502 s for both modes (server start 37-43 s,
# random-ids / shared prefix 23-30 s each of which ~15 s is the client's start-up, the KV-bound run 86-101 s, the
# multi-turn workload 52-56 s). The KV-bound run (16 x 1,536-token prompts, 64 new tokens): the dense pool
# (4,608 tokens) holds 2 requests at a time, the sphkv pool (17,792) reaches max_running_requests = 8.
# The multi-turn workload outgrows the dense pool (4,608 tokens; the sphkv server ends with 11,776 in its tree), so
# the capacity shows in the prefix hit rate; the quality probe reads a 1K cached prefix (the former 4K prefix's
# prefill alone took 3.5 min on the dense torch_native server in stop 16's attempt).
QUICK = Workload(conversations=12, turns=3, system_tokens=1024, user_tokens=256, answer_tokens=16, concurrency=4,
                 dense_tokens=4608, context=1024, continuation=128, stream_tokens=32, bench_prompts=16,
                 bench_input_len=128, bench_output_len=32, bench_gsp_groups=2, bench_gsp_system_len=256,
                 bench_gsp_question_len=32, kvbound_prompts=16, kvbound_input_len=1536, kvbound_output_len=64)


# -- inputs ---------------------------------------------------------------------------------------------
def _tokens(model: Path, n: int) -> tuple[object, list[int]]:
    from transformers import AutoTokenizer

    from sphkv_hf.data import load_essays

    tok = AutoTokenizer.from_pretrained(model)
    return tok, tok(load_essays(), add_special_tokens=False)["input_ids"][:n]


def build_inputs(w: Workload, model: Path):
    need = w.context + w.continuation + w.system_tokens + w.conversations * w.turns * w.user_tokens
    tok, ids = _tokens(model, need + 10)
    ctx, cont = ids[:w.context], ids[w.context:w.context + w.continuation]
    off = w.context + w.continuation
    system = ("You are a careful reading assistant. Answer in one short sentence. Reference essays:\n"
              + tok.decode(ids[off:off + w.system_tokens]))
    off += w.system_tokens
    users = [[f"Passage {c}.{t}: " + tok.decode(ids[off + (c * w.turns + t) * w.user_tokens:
                                                    off + (c * w.turns + t + 1) * w.user_tokens])
              + "\nWhat is the main point of this passage?" for t in range(w.turns)] for c in range(w.conversations)]
    return tok, ctx, cont, system, users


# -- measurements ---------------------------------------------------------------------------------------
def _post(url: str, payload: dict, timeout: float = 900) -> dict:
    r = requests.post(url + "/generate", json=payload, timeout=timeout)
    r.raise_for_status()
    return r.json()


def _stream(url: str, text: str, n: int) -> dict:
    """One streamed greedy request; returns meta_info plus ``ttft`` and ``latency`` (seconds) and the text."""
    t0 = time.perf_counter()
    ttft, last = None, None
    with requests.post(url + "/generate", stream=True, timeout=900, json={
            "text": text, "stream": True,
            "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            last = json.loads(line[5:])
    return {**last["meta_info"], "ttft": ttft, "latency": time.perf_counter() - t0, "text": last["text"]}


def quality(url: str, ctx: list[int], cont: list[int]) -> dict:
    requests.post(url + "/flush_cache", timeout=60)
    _post(url, {"input_ids": ctx, "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    out = _post(url, {"input_ids": ctx + cont, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                      "return_logprob": True, "logprob_start_len": len(ctx)})
    lps = [x[0] for x in out["meta_info"]["input_token_logprobs"] if x[0] is not None][-len(cont):]
    return {"cont_logprob_mean": statistics.fmean(lps), "cont_tokens": len(lps),
            "cont_cached_tokens": out["meta_info"]["cached_tokens"]}


def single_stream(url: str, n: int) -> float:
    out = _stream(url, "Write a long story about a lighthouse keeper and the sea.", n)
    return out["completion_tokens"] / max(out["latency"] - out["ttft"], 1e-9)


def workload(url: str, tok, system: str, users: list[list[str]], w: Workload) -> dict:
    requests.post(url + "/flush_cache", timeout=60)
    history = [[{"role": "system", "content": system}] for _ in users]
    records = []

    def one(c: int, t: int) -> dict:
        msgs = history[c] + [{"role": "user", "content": users[c][t]}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        rec = _stream(url, text, w.answer_tokens)
        history[c] = msgs + [{"role": "assistant", "content": rec["text"]}]
        return rec

    t0 = time.perf_counter()
    with ThreadPoolExecutor(w.concurrency) as ex:
        for t in range(w.turns):                                   # turn-major: conversations interleave
            records += list(ex.map(lambda c: one(c, t), range(len(users))))
    wall = time.perf_counter() - t0
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["cached_tokens"] for r in records)
    out = sum(r["completion_tokens"] for r in records)
    ttfts = sorted(r["ttft"] for r in records)
    return {"requests": len(records), "wall_s": wall, "completion_tokens": out, "throughput_tok_s": out / wall,
            "total_throughput_tok_s": (prompt + out) / wall, "prompt_tokens": prompt, "cached_tokens": cached,
            "prefix_hit_rate": cached / max(prompt, 1), "ttft_mean_s": statistics.fmean(ttfts),
            "ttft_p50_s": ttfts[len(ttfts) // 2], "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
            "retractions": sum(r.get("num_retractions", 0) or 0 for r in records)}


def bench_serving(url: str, model: Path, w: Workload, dataset: str, out: Path) -> dict:
    """Run ``python -m sglang.bench_serving`` against ``url``; returns its JSON result line.

    ``dataset``: ``random-ids``, ``generated-shared-prefix`` or ``kvbound`` (random-ids with the
    ``kvbound_*`` sizes: long prompts, all sent at once, so the dense pool binds)."""
    import subprocess

    prompts = w.kvbound_prompts if dataset == "kvbound" else w.bench_prompts
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", url,
           "--model", str(model), "--tokenizer", str(model),
           "--dataset-name", "random-ids" if dataset == "kvbound" else dataset,
           "--num-prompts", str(prompts), "--seed", "1", "--disable-tqdm", "--output-file", str(out)]
    if dataset == "random-ids":
        cmd += ["--random-input-len", str(w.bench_input_len), "--random-output-len", str(w.bench_output_len),
                "--random-range-ratio", "1.0"]
    elif dataset == "kvbound":
        cmd += ["--random-input-len", str(w.kvbound_input_len), "--random-output-len", str(w.kvbound_output_len),
                "--random-range-ratio", "1.0", "--max-concurrency", str(prompts)]
    else:
        cmd += ["--gsp-num-groups", str(w.bench_gsp_groups),
                "--gsp-prompts-per-group", str(max(1, w.bench_prompts // w.bench_gsp_groups)),
                "--gsp-system-prompt-len", str(w.bench_gsp_system_len),
                "--gsp-question-len", str(w.bench_gsp_question_len), "--gsp-output-len", str(w.bench_output_len)]
    out.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3000, env=env)
    if res.returncode != 0 or not out.is_file():
        raise RuntimeError(f"bench_serving {dataset} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(out.read_text().strip().splitlines()[-1])


def scheduler_log_stats(text: str) -> dict:
    """Batch sizes the scheduler logged in ``text`` (a slice of a server log): ``Decode batch, #running-req: N``
    lines (one per decode step with ``--decode-log-interval 1``) → mean / max running requests; queued
    requests seen; ``KV cache pool is full. Retract requests.`` lines → retractions."""
    import re

    running = [int(m) for m in re.findall(r"Decode batch, #running-req: (\d+)", text)]
    queued = [int(m) for m in re.findall(r"Decode batch, .*?#queue-req: (\d+)", text)]
    return {"decode_steps_logged": len(running),
            "running_req_mean": statistics.fmean(running) if running else 0.0,
            "running_req_max": max(running, default=0), "queue_req_max": max(queued, default=0),
            "retractions": text.count("KV cache pool is full. Retract requests.")}


def server_state(url: str) -> dict:
    state = requests.get(url + "/get_server_info", timeout=60).json()["internal_states"][0]
    return {"max_total_num_tokens": state["memory_usage"]["token_capacity"],
            "kv_cache_gb": state["memory_usage"]["kvcache"], "sphkv": state.get("sphkv")}


def run_mode(mode: str, w: Workload, model: Path, inputs, kv_bytes: int, logdir: Path, *, bench_only: bool = False,
             datasets: tuple[str, ...] = ("random-ids", "generated-shared-prefix", "kvbound")) -> dict:
    tok, ctx, cont, system, users = inputs
    # SGLang's 300 s scheduler watchdog kills a server whose one forward (a long prefill) is slower
    # than that, which happens on the shared 2-core machine under other jobs' load
    common = ["--max-running-requests", str(w.max_running_requests), "--enable-cache-report",
              "--watchdog-timeout", "3600", "--decode-log-interval", "1"]
    if mode == "dense":
        srv = ServerProcess(model, sphkv=False, args=["--max-total-tokens", str(w.dense_tokens), *common],
                            log_path=logdir / "dense.log")
    else:
        srv = ServerProcess(model, args=["--sphkv-preset", w.preset, "--sphkv-budget", str(kv_bytes), *common],
                            log_path=logdir / "sphkv.log")
    with srv:
        rec = {"mode": mode, "start_s": srv.start_seconds, "kv_budget_bytes": kv_bytes}
        phases = rec["phase_s"] = {}
        clock = [time.perf_counter()]

        def lap(name: str) -> None:
            now = time.perf_counter()
            phases[name] = now - clock[0]
            clock[0] = now
            print(f"[{mode}] {name}: {phases[name]:.0f} s (load {os.getloadavg()[0]:.2f})", flush=True)
        rec.update(server_state(srv.url))
        print(f"[{mode}] up in {srv.start_seconds:.0f} s, max_total_num_tokens={rec['max_total_num_tokens']}",
              flush=True)
        if "random-ids" in datasets:
            requests.post(srv.url + "/flush_cache", timeout=60)
            b = bench_serving(srv.url, model, w, "random-ids", logdir / f"{mode}-bench-random-ids.jsonl")
            rec.update(bench_output_tok_s=b["output_throughput"], bench_mean_itl_ms=b["mean_itl_ms"],
                       bench_mean_ttft_ms=b["mean_ttft_ms"], bench_completed=b["completed"])
            lap("bench_random_ids")
        if "generated-shared-prefix" in datasets:
            requests.post(srv.url + "/flush_cache", timeout=60)
            b = bench_serving(srv.url, model, w, "generated-shared-prefix", logdir / f"{mode}-bench-gsp.jsonl")
            rec.update(bench_prefix_output_tok_s=b["output_throughput"], bench_prefix_mean_itl_ms=b["mean_itl_ms"],
                       bench_prefix_mean_ttft_ms=b["mean_ttft_ms"], bench_prefix_completed=b["completed"])
            lap("bench_shared_prefix")
        if "kvbound" in datasets:
            requests.post(srv.url + "/flush_cache", timeout=60)
            log0, cpu0 = srv.log_path.stat().st_size, srv.cpu_seconds()
            b = bench_serving(srv.url, model, w, "kvbound", logdir / f"{mode}-bench-kvbound.jsonl")
            cpu = srv.cpu_seconds() - cpu0
            with open(srv.log_path, errors="replace") as f:
                f.seek(log0)
                st = scheduler_log_stats(f.read())
            rec.update(bench_kvbound_output_tok_s=b["output_throughput"], bench_kvbound_mean_itl_ms=b["mean_itl_ms"],
                       bench_kvbound_mean_ttft_ms=b["mean_ttft_ms"], bench_kvbound_completed=b["completed"],
                       bench_kvbound_running_req=st["running_req_mean"],
                       bench_kvbound_running_req_max=st["running_req_max"],
                       bench_kvbound_queue_req_max=st["queue_req_max"],
                       bench_kvbound_retractions=st["retractions"], bench_kvbound_server_cpu_s=cpu,
                       bench_kvbound_output_tok_per_server_cpu_s=b["total_output_tokens"] / cpu)
            lap("bench_kvbound")
        if bench_only:
            rec["loadavg_1min"] = [os.getloadavg()[0]]
            return rec
        rec.update(quality(srv.url, ctx, cont))
        lap("quality")
        rec["single_stream_tok_s"] = single_stream(srv.url, w.stream_tokens)
        lap("single_stream")
        requests.post(srv.url + "/flush_cache", timeout=60)
        cpu0, load0 = srv.cpu_seconds(), os.getloadavg()[0]
        rec.update(workload(srv.url, tok, system, users, w))
        lap("multi_turn")
        rec["workload_server_cpu_s"] = srv.cpu_seconds() - cpu0
        rec["output_tok_per_server_cpu_s"] = rec["completion_tokens"] / rec["workload_server_cpu_s"]
        rec["total_tok_per_server_cpu_s"] = (rec["prompt_tokens"] + rec["completion_tokens"]) / rec["workload_server_cpu_s"]
        rec["loadavg_1min"] = [load0, os.getloadavg()[0]]
        end = server_state(srv.url)
        rec["sphkv_stats"] = end["sphkv"]
        if end["sphkv"]:
            rec["tokens_resident"] = end["sphkv"].get("tree_tokens")
            rec["pages_demoted"] = end["sphkv"].get("pages_demoted")
        print(f"[{mode}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in rec.items() if k != "sphkv_stats" and k != "sphkv"), flush=True)
    rec.pop("sphkv", None)
    return rec


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, PLOT_TITLES[k]) for k in PLOT_KEYS]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2))
    colors = ["#888888", "#2a7ab0", "#c0504d", "#9bbb59", "#8064a2"]
    for ax, (k, title) in zip(axes, keys):
        vals = [r[k] for r in records]
        ax.bar([r["mode"] for r in records], vals, color=colors[:len(records)])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


PLOT_TITLES = dict([("max_total_num_tokens", "tokens in the same KV memory"), ("throughput_tok_s", "output tokens / s"),
            ("bench_output_tok_s", "bench_serving random-ids tok/s"),
            ("bench_prefix_output_tok_s", "bench_serving shared-prefix tok/s"),
            ("bench_kvbound_output_tok_s", "bench_serving KV-bound tok/s"),
            ("prefix_hit_rate", "prefix hit rate"), ("ttft_mean_s", "mean TTFT (s)"),
            ("total_tok_per_server_cpu_s", "tokens / server CPU-s"), ("single_stream_tok_s", "one stream, tokens / s"),
            ("cont_logprob_mean", "continuation mean logprob")])
PLOT_KEYS = tuple(PLOT_TITLES)


def merge_records(path: Path, records: list[dict]) -> list[dict]:
    """Read-modify-write of a results file keyed by ``mode``: rows of ``records`` replace the rows of
    the same mode already in ``path``; rows of other modes (another module's, e.g. ``sphkv-rdr``) are
    kept in their place. Returns the merged list (also written to ``path``)."""
    old = json.loads(path.read_text()) if path.is_file() else []
    if not isinstance(old, list) or not all(isinstance(r, dict) and "mode" in r for r in old):
        raise ValueError(f"{path}: expected a JSON list of records with a 'mode' field")
    new = {r["mode"]: r for r in records}
    merged = [new.pop(r["mode"], r) for r in old] + list(new.values())
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="the QUICK workload: 502 s for both modes on the 2-core machine at load 1.5-3.3 "
                         "(2026-12-02; make serving-quick with retention --quick: 588 s)")
    ap.add_argument("--model", type=Path, default=ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--modes", default="dense,sphkv")
    ap.add_argument("--bench-only", action="store_true",
                    help="only python -m sglang.bench_serving (the datasets of --datasets), no quality / workload")
    ap.add_argument("--datasets", default="random-ids,generated-shared-prefix,kvbound",
                    help="bench_serving runs: random-ids, generated-shared-prefix, kvbound (random-ids with "
                         "kvbound_prompts x kvbound_input_len-token prompts: the dense pool binds)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a Workload field, e.g. --set conversations=8")
    args = ap.parse_args(argv)
    w = QUICK if args.quick else Workload()
    for item in args.set:
        key, _, val = item.partition("=")
        w = Workload(**{**asdict(w), key: type(getattr(w, key))(val)})
    if not (args.model / "config.json").is_file():
        import subprocess
        subprocess.run([sys.executable, "-m", "sphkv_hf.prepare_model"], check=True, cwd=ROOT)
    out = args.out or RESULTS / ("serving-quick.json" if args.quick else "serving.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    hf = json.loads((args.model / "config.json").read_text())
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    kv_bytes = w.dense_tokens * hf["num_hidden_layers"] * hf["num_key_value_heads"] * head_dim * 2 * 2
    inputs = build_inputs(w, args.model)
    logdir = out.parent / (out.stem + "-logs")
    logdir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    records = []
    for m in args.modes.split(","):
        records.append(run_mode(m, w, args.model, inputs, kv_bytes, logdir, bench_only=args.bench_only,
                                datasets=tuple(args.datasets.split(","))))
        merge_records(out, records)                                    # partial results survive a later failure
    by = {r["mode"]: r for r in records}
    if "dense" in by and "sphkv" in by and not args.bench_only:
        d, s = by["dense"], by["sphkv"]
        s["vs_dense"] = {"capacity_x": s["max_total_num_tokens"] / d["max_total_num_tokens"],
                         "throughput_x": s["throughput_tok_s"] / d["throughput_tok_s"],
                         "bench_output_tok_s_x": s["bench_output_tok_s"] / d["bench_output_tok_s"],
                         "bench_prefix_output_tok_s_x": s["bench_prefix_output_tok_s"] / d["bench_prefix_output_tok_s"],
                         "bench_kvbound_output_tok_s_x": s["bench_kvbound_output_tok_s"] / d["bench_kvbound_output_tok_s"],
                         "bench_kvbound_running_req_x": s["bench_kvbound_running_req"] / d["bench_kvbound_running_req"],
                         "bench_kvbound_tok_per_server_cpu_s_x": s["bench_kvbound_output_tok_per_server_cpu_s"]
                         / d["bench_kvbound_output_tok_per_server_cpu_s"],
                         "tok_per_server_cpu_s_x": s["total_tok_per_server_cpu_s"] / d["total_tok_per_server_cpu_s"],
                         "prefix_hit_rate_delta": s["prefix_hit_rate"] - d["prefix_hit_rate"],
                         "cont_logprob_rel_diff": abs(s["cont_logprob_mean"] - d["cont_logprob_mean"])
                         / abs(d["cont_logprob_mean"])}
    for r in records:
        r["workload"] = asdict(w)
        r["device"] = "cpu" if not Path("/dev/nvidia0").exists() else "cuda"
    total = time.perf_counter() - t0
    merged = merge_records(out, records)
    if not args.bench_only:
        plot([r for r in merged if all(k in r for k in PLOT_KEYS)], out.with_suffix(".png"))
    print(f"wrote {out}" + ("" if args.bench_only else f" and {out.with_suffix('.png')}") + f" in {total:.0f} s")
    if "sphkv" in by and "vs_dense" in by["sphkv"]:
        print("sphkv vs dense:", json.dumps(by["sphkv"]["vs_dense"]))
    return records


if __name__ == "__main__":
    main()
