# SPDX-License-Identifier: Apache-2.0
"""Load test of a sphkv server: many concurrent requests of mixed length under memory pressure, plus faults.

``python -m benchmarks.serving.load [--quick] [--url URL] [--out PATH]`` (``make load-quick``). Without
``--url`` it starts a real sphkv server on 127.0.0.1 (SmolLM2-135M-Instruct, a ``--max-total-tokens``
pool small enough that the prompts do not fit together: the top tier fills, cold radix nodes are
demoted, then evicted) with freed-page poisoning on (``SPHKV_DEBUG_POISON=1``: a read after free
fails the request), and stops it afterwards.

The workload is a fixed, seeded list of ``requests`` jobs run by ``concurrency`` client threads:

* **chat** — ``/v1/chat/completions`` with one of a few shared system prompts and a user turn of
  16–400 tokens (radix sharing and competition for the pool);
* **generate** — ``/generate`` with a short or medium prompt, with or without a shared prefix;
* **near-capacity** — prompts of ``max_req_input_len - 1 - k`` tokens (the longest SGLang admits; it
  rejects exactly ``max_req_input_len``): each needs nearly the whole pool, so everything cached
  must be evicted first;
* **abort** — a long ``/generate`` with a known ``rid``, aborted through ``/abort_request`` while it
  runs; **disconnect** — a streaming request whose client closes the connection after two chunks;
  **client timeout** — a non-streaming request the client gives up on after one second.

An ordinary job that does not come back 200 (or times out) is an error; an abort/disconnect job is
an error only if the server answers it with an error status. After the load: once idle, every
coded page must belong to the radix tree and no staging slot may be held (``leaked_pages_idle``);
after ``/flush_cache`` every page must be free (``leaked_pages``). Also probed: the input limit
(``max_req_input_len - 1`` tokens answered, ``max_req_input_len`` refused with 400).

Writes ``benchmarks/results/load-quick.json`` (or ``load.json``): ``requests`` (completed ordinary
jobs), ``errors``, ``p50_ms``, ``p99_ms``, ``leaked_pages``, ``demoted_pages``, ``evicted_pages``,
``max_concurrent`` and more. Talks to 127.0.0.1 only. Exit status 1 if the bar (zero errors, zero
leaked pages, demotion and eviction both exercised) is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = Path(os.environ.get("SPHKV_MODEL", ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"))

__all__ = ["LoadConfig", "QUICK", "FULL", "SHORT", "SYSTEM", "make_jobs", "run_load", "server_args", "main"]


@dataclass(frozen=True)
class LoadConfig:
    """Shape of one load run (all counts > 0).

    Parameters
    ----------
    requests : ordinary jobs (chat / generate / near-capacity); the faults come on top.
    concurrency : client threads (requests in flight at once).
    answer_tokens : ``max_tokens`` of an ordinary answer (greedy).
    near_capacity : how many ordinary jobs are near-capacity prompts.
    aborts, disconnects, client_timeouts : fault jobs of each kind, spread through the run.
    max_total_tokens : the server's KV pool in tokens (``--max-total-tokens``).
    page_size : the server's ``--page-size`` (the sphkv page; small pages make a small pool many pages).
    max_running_requests : the server's ``--max-running-requests`` (>= concurrency).
    sample_s : pool occupancy sampling period.
    request_timeout_s : per-request client timeout (a timeout of an ordinary job is an error).
    seed : the job list.
    """

    requests: int = 240
    concurrency: int = 12
    answer_tokens: int = 8
    near_capacity: int = 8
    aborts: int = 6
    disconnects: int = 6
    client_timeouts: int = 4
    max_total_tokens: int = 2048
    page_size: int = 64
    max_running_requests: int = 12
    sample_s: float = 2.0
    request_timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self):
        for name, value in asdict(self).items():
            if name != "seed" and value <= 0:
                raise ValueError(f"{name}={value!r} must be > 0")
        if self.near_capacity > self.requests:
            raise ValueError(f"near_capacity={self.near_capacity} > requests={self.requests}")
        if self.concurrency > self.max_running_requests:
            raise ValueError(f"concurrency={self.concurrency} must be <= max_running_requests="
                             f"{self.max_running_requests}")


# Sized for a shared 2-core CPU, where SmolLM2 (bf16, torch CPU) prefills only ~5-10 tokens/s while
# other jobs run (measured in the server log): a 256-token pool of 16-token pages (16 pages, ~10 in
# the top tier), prompts of ~10-60 new tokens over short shared system prompts, two near-capacity
# prompts (~220 tokens), 2-token answers. Demotion and eviction still happen (the bar checks both).
QUICK = LoadConfig(requests=104, concurrency=8, answer_tokens=2, near_capacity=2, aborts=2, disconnects=2,
                   client_timeouts=2, max_total_tokens=256, page_size=16, max_running_requests=8)
FULL = LoadConfig()
SHORT = LoadConfig(requests=12, concurrency=4, answer_tokens=2, near_capacity=1, aborts=1, disconnects=1,
                   client_timeouts=1, max_total_tokens=512, page_size=16,
                   max_running_requests=8)      # tests/test_reliability_server.py


def server_args(cfg: LoadConfig) -> list[str]:
    return ["--max-total-tokens", str(cfg.max_total_tokens), "--page-size", str(cfg.page_size),
            "--max-running-requests", str(cfg.max_running_requests), "--enable-cache-report"]


# -- prompts ------------------------------------------------------------------------------------------
_WORDS = ("river mountain lantern harbor violet copper meadow signal orbit canyon ember falcon garden "
          "glacier island jasmine kettle ledger marble nectar oasis pepper quartz saffron timber velvet").split()


def _sentence(seed: int) -> str:
    w = [_WORDS[(seed * 7 + i * 13) % len(_WORDS)] for i in range(9)]
    return f"Note {seed}: the {w[0]} near the {w[1]} keeps {w[2]} {w[3]} and {w[4]} for the {w[5]} {w[6]}."


def _text(seed: int, n_sentences: int) -> str:
    return " ".join(_sentence(seed * 1000 + i) for i in range(n_sentences))


SYSTEM = "You are a concise assistant. Remember these notes. " + " ".join(_sentence(i) for i in range(30))
SYSTEMS = [f"You are concise assistant number {i}. Remember these notes. " + _text(90 + i, 1 + i)
           for i in range(3)]                                         # ~40, ~55, ~70 tokens with the template


@dataclass(frozen=True)
class Job:
    index: int
    kind: str              # chat | generate | near_capacity | abort | disconnect | client_timeout
    system: int            # -1: no shared prefix
    user_sentences: int    # ~12 tokens each (near_capacity: ignored, sized from the tokenizer)


def make_jobs(cfg: LoadConfig) -> list[Job]:
    """The seeded job list: ordinary jobs of mixed length with the faults and near-capacity prompts
    spread evenly through it."""
    rng = random.Random(cfg.seed)
    jobs = []
    for i in range(cfg.requests):
        r = rng.random()
        if r < 0.45:
            jobs.append(Job(i, "generate", -1, rng.randint(0, 1)))             # short (~10-25), no shared prefix
        elif r < 0.65:
            jobs.append(Job(i, "generate", rng.randrange(len(SYSTEMS)), rng.randint(0, 1)))
        elif r < 0.95:
            jobs.append(Job(i, "chat", rng.randrange(len(SYSTEMS)), rng.randint(0, 1)))
        else:
            jobs.append(Job(i, "generate", -1, rng.randint(4, 8)))             # medium (~50-100), unshared
    step = max(1, cfg.requests // cfg.near_capacity)
    for j in range(cfg.near_capacity):
        i = min(cfg.requests - 1, step // 2 + j * step)
        jobs[i] = Job(i, "near_capacity", -1, 0)
    faults = ["abort"] * cfg.aborts + ["disconnect"] * cfg.disconnects + ["client_timeout"] * cfg.client_timeouts
    rng.shuffle(faults)
    out, every = [], max(1, cfg.requests // max(1, len(faults)))
    for i, job in enumerate(jobs):
        out.append(job)
        if faults and i % every == every // 2:
            out.append(Job(-1, faults.pop(), rng.randrange(len(SYSTEMS)), 4))
    out.extend(Job(-1, kind, 0, 4) for kind in faults)
    return [Job(i, j.kind, j.system, j.user_sentences) for i, j in enumerate(out)]


# -- server statistics ----------------------------------------------------------------------------------
def server_info(url: str) -> dict:
    return requests.get(url + "/get_server_info", timeout=60).json()


def pool_stats(url: str) -> dict:
    return server_info(url)["internal_states"][0]["sphkv"]


def _occupancy(s: dict) -> dict:
    return dict(coded_pages=s["coded_pages"], free_phys_pages=s["free_phys_pages"], staging_in_use=s["staging_in_use"],
                tree_tokens=s.get("tree_tokens"), protected_tokens=s.get("protected_tokens"),
                pages_demoted=s["pages_demoted"], pages_released=s["pages_released"],
                evicted_tokens=s.get("evicted_tokens"))


def leaked(s: dict, *, idle: bool) -> int:
    """Pages held that nothing owns: idle → coded pages outside the tree + staging slots; after a
    flush → every coded page, staging slot or used physical page."""
    coded, staging = sum(s["coded_pages"]), s["staging_in_use"]
    if idle:
        return max(0, coded - (s.get("tree_tokens") or 0) // s["page_size"]) + staging
    return coded + staging + sum(s["phys_pages"]) - sum(s["free_phys_pages"])


# -- the jobs -------------------------------------------------------------------------------------------
class _Tokens:
    """Text of an exact token count (the served model's tokenizer, loaded from the model folder)."""

    def __init__(self, model: Path | None):
        self.tok = None
        if model is not None and (Path(model) / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(str(model))

    def ids_of(self, n: int, seed: int) -> list[int]:
        """``n`` token ids of note text (sent as ``input_ids``: the server adds nothing)."""
        if self.tok is None:
            return [100 + (seed * 31 + i * 7) % 20000 for i in range(n)]
        ids = self.tok(_text(seed, n // 8 + 4), add_special_tokens=False).input_ids
        while len(ids) < n:
            ids = ids + ids
        return ids[:n]


def _prompt(job: Job) -> str:
    user = (_text(500 + job.index, job.user_sentences) + " ") if job.user_sentences else ""
    user += f"Question {job.index}: what does note {job.index} keep?"
    return (SYSTEMS[job.system] + "\n" + user) if job.system >= 0 else user


def _run_job(url: str, cfg: LoadConfig, job: Job, ctx: dict) -> dict:
    rec = dict(job=job.index, kind=job.kind)
    t0 = time.perf_counter()
    with ctx["lock"]:
        ctx["in_flight"] += 1
        ctx["max_in_flight"] = max(ctx["max_in_flight"], ctx["in_flight"])
    try:
        if job.kind == "chat":
            r = requests.post(url + "/v1/chat/completions", timeout=cfg.request_timeout_s, json={
                "model": ctx["model_name"], "max_tokens": cfg.answer_tokens, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEMS[job.system]},
                             {"role": "user", "content": _prompt(Job(job.index, "chat", -1, job.user_sentences))}]})
            _check(r, rec)
            if r.status_code == 200:
                usage = r.json().get("usage") or {}
                rec.update(prompt_tokens=usage.get("prompt_tokens"), out_tokens=usage.get("completion_tokens"),
                           cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"))
        elif job.kind in ("generate", "near_capacity"):
            prompt = ({"input_ids": ctx["tokens"].ids_of(ctx["near_len"] - 3 * (job.index % 4), job.index)}
                      if job.kind == "near_capacity" else {"text": _prompt(job)})
            r = requests.post(url + "/generate", timeout=cfg.request_timeout_s, json={
                **prompt, "sampling_params": {"max_new_tokens": cfg.answer_tokens, "temperature": 0}})
            _check(r, rec)
            if r.status_code == 200:
                meta = r.json().get("meta_info") or {}
                rec.update(prompt_tokens=meta.get("prompt_tokens"), out_tokens=meta.get("completion_tokens"),
                           cached_tokens=meta.get("cached_tokens"))
                if job.kind == "generate" and not r.json().get("output_ids", [1]):
                    rec["error"] = "empty generation"
        elif job.kind == "abort":
            rec.update(_aborted(url, _prompt(job)))
        elif job.kind == "disconnect":
            rec.update(_closed_stream(url, _prompt(job)))
        elif job.kind == "client_timeout":
            try:
                requests.post(url + "/generate", timeout=1.0, json={"text": _prompt(job), "sampling_params": {
                    "max_new_tokens": 12, "temperature": 0, "ignore_eos": True}})
                rec["outcome"] = "finished within 1 s"
            except requests.exceptions.Timeout:
                rec["outcome"] = "client gave up"
    except Exception as e:                                           # noqa: BLE001 - every failure is recorded
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        with ctx["lock"]:
            ctx["in_flight"] -= 1
    rec["ms"] = round(1000 * (time.perf_counter() - t0), 1)
    return rec


def _check(r: requests.Response, rec: dict) -> None:
    if r.status_code != 200:
        rec["error"] = f"HTTP {r.status_code}: {r.text[:300]}"


def _closed_stream(url: str, prompt: str) -> dict:
    """A long streaming request whose client reads two chunks and closes the connection."""
    chunks = 0
    with requests.post(url + "/generate", stream=True, timeout=600, json={
            "text": prompt + " Tell a very long story.", "stream": True,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}) as r:
        if r.status_code != 200:
            return dict(error=f"HTTP {r.status_code}")
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                chunks += 1
            if chunks >= 2:
                break
    return dict(outcome="closed after chunks", chunks_read=chunks)


def _aborted(url: str, prompt: str) -> dict:
    """A long request with a known rid, aborted through ``/abort_request`` while it runs."""
    rid = "load-abort-" + uuid.uuid4().hex[:8]
    res: dict = {}

    def call():
        try:
            r = requests.post(url + "/generate", timeout=600, json={
                "rid": rid, "text": prompt + " Write a long essay.",
                "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}})
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            res.update(status=r.status_code, finish=((body.get("meta_info") or {}).get("finish_reason") or {}).get("type"))
        except Exception as e:                                       # noqa: BLE001
            res.update(error=str(e)[:200])

    th = threading.Thread(target=call)
    th.start()
    time.sleep(1.0)
    statuses = []
    while th.is_alive() and len(statuses) < 300:
        # an abort that arrives while the request is still queued in the tokenizer is a no-op: repeat
        statuses.append(requests.post(url + "/abort_request", json={"rid": rid}, timeout=60).status_code)
        th.join(2.0)
    th.join(620)
    out = dict(rid=rid, abort_status=statuses[0] if statuses else None, abort_calls=len(statuses), **res)
    if any(c != 200 for c in statuses) or res.get("status") not in (200, None):
        out.setdefault("error", f"abort {statuses[:3]}, request {res.get('status')}")
    return out


def _sampler(url: str, cfg: LoadConfig, stop: threading.Event, out: list, t0: float, ctx: dict):
    while not stop.is_set():
        try:
            out.append(dict(t=round(time.monotonic() - t0, 1), in_flight=ctx["in_flight"], **_occupancy(pool_stats(url))))
        except Exception as e:                                       # noqa: BLE001
            out.append(dict(t=round(time.monotonic() - t0, 1), error=str(e)[:200]))
        stop.wait(cfg.sample_s)


def _wait_idle(url: str, timeout: float = 120.0) -> dict:
    t0 = time.monotonic()
    while True:
        s = pool_stats(url)
        if (s["staging_in_use"] == 0 and not s.get("protected_tokens")) or time.monotonic() - t0 > timeout:
            return s
        time.sleep(0.5)


def _flush(url: str, timeout: float = 60.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if requests.post(url + "/flush_cache", timeout=60).status_code == 200:
            return True
        time.sleep(1.0)
    return False


def _input_limit_probe(url: str, tokens: _Tokens, limit: int) -> dict:
    """``limit - 1`` prompt tokens are answered; exactly ``limit`` (what SGLang reports) is refused."""
    out = dict(max_req_input_len=limit)
    for n, name in ((limit, "limit"), (limit - 1, "limit_minus_1")):
        r = requests.post(url + "/generate", timeout=600, json={
            "input_ids": tokens.ids_of(n, 77), "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
        out[f"status_at_{name}"] = r.status_code
        if r.status_code != 200:
            out[f"message_at_{name}"] = r.text[:300]
    return out


def run_load(url: str, cfg: LoadConfig, model: Path | None = MODEL) -> dict:
    """Run the jobs, the accounting and the input-limit probe against the server at ``url``."""
    _flush(url)
    info = server_info(url)
    limit = int(info.get("max_req_input_len") or info["internal_states"][0].get("max_req_input_len"))
    start = pool_stats(url)
    tokens = _Tokens(model)
    ctx = dict(lock=threading.Lock(), in_flight=0, max_in_flight=0, tokens=tokens, near_len=limit - 1,
               model_name=(info.get("served_model_name") or "default"))
    jobs = make_jobs(cfg)
    samples: list[dict] = []
    stop = threading.Event()
    t0 = time.monotonic()
    sampler = threading.Thread(target=_sampler, args=(url, cfg, stop, samples, t0, ctx), daemon=True)
    sampler.start()
    with ThreadPoolExecutor(cfg.concurrency) as ex:
        records = list(ex.map(lambda j: _run_job(url, cfg, j, ctx), jobs))
    load_s = time.monotonic() - t0
    stop.set()
    sampler.join(10)
    idle = _wait_idle(url)
    after_load = _occupancy(idle)
    probe = _input_limit_probe(url, tokens, limit)
    flushed = _flush(url)
    final = pool_stats(url)
    ordinary = [r for r in records if r["kind"] in ("chat", "generate", "near_capacity")]
    ok = [r for r in ordinary if "error" not in r]
    faults = [r for r in records if r not in ordinary]
    lat = sorted(r["ms"] for r in ok)
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None   # noqa: E731
    page = start["page_size"]
    evicted_tokens = (idle.get("evicted_tokens") or 0) - (start.get("evicted_tokens") or 0)
    by_kind = {k: sum(1 for r in records if r["kind"] == k) for k in sorted({r["kind"] for r in records})}
    prompt_lens = sorted(r["prompt_tokens"] for r in ok if r.get("prompt_tokens"))
    result = dict(
        config=asdict(cfg), url=url, duration_s=round(load_s, 1),
        requests=len(ok), errors=sum(1 for r in records if "error" in r), jobs=len(records), jobs_by_kind=by_kind,
        error_samples=[f"{r['kind']}: {r['error']}" for r in records if "error" in r][:8],
        p50_ms=pct(0.50), p99_ms=pct(0.99), mean_ms=round(statistics.fmean(lat), 1) if lat else None,
        requests_per_s=round(len(ok) / load_s, 2), max_concurrent=ctx["max_in_flight"],
        pool_tokens=cfg.max_total_tokens, max_req_input_len=limit,
        prompt_tokens=dict(min=prompt_lens[0], p50=prompt_lens[len(prompt_lens) // 2], max=prompt_lens[-1])
        if prompt_lens else None,
        near_capacity_answered=sum(1 for r in ok if r["kind"] == "near_capacity"),
        cached_token_share=round(sum(r.get("cached_tokens") or 0 for r in ok)
                                 / max(1, sum(r.get("prompt_tokens") or 0 for r in ok)), 3),
        chat_cached_tokens_reported=all(r.get("cached_tokens") is not None for r in ok if r["kind"] == "chat"),
        demoted_pages=idle["pages_demoted"] - start["pages_demoted"],
        evicted_pages=evicted_tokens // page,
        released_pages=idle["pages_released"] - start["pages_released"],
        nonfinite_rows=final["nonfinite_rows"] - start["nonfinite_rows"],
        peak_coded_pages=max((sum(s["coded_pages"]) for s in samples if "coded_pages" in s), default=0),
        logical_pages=cfg.max_total_tokens // page, phys_pages=start["phys_pages"],
        faults=faults, input_limit=probe, after_load_idle=after_load, leaked_pages_idle=leaked(idle, idle=True),
        flushed=flushed, after_flush=_occupancy(final),
        leaked_pages=leaked(final, idle=False) if flushed else None,
        latency_ms_by_kind={k: round(statistics.median([r["ms"] for r in ok if r["kind"] == k]), 1)
                            for k in ("chat", "generate", "near_capacity") if any(r["kind"] == k for r in ok)},
        occupancy=samples)
    return result


def passed(result: dict) -> bool:
    return (result["errors"] == 0 and result["leaked_pages"] == 0 and result["leaked_pages_idle"] == 0
            and result["demoted_pages"] > 0 and result["evicted_pages"] > 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="104 requests + 6 faults, 8 concurrent, 256-token pool "
                                                          "(make load-quick)")
    ap.add_argument("--url", default=None, help="an already running sphkv server on 127.0.0.1")
    ap.add_argument("--requests", type=int, default=None, help="ordinary jobs (overrides the mode's)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/load[-quick].json)")
    a = ap.parse_args(argv)
    cfg = QUICK if a.quick else FULL
    if a.requests is not None:
        cfg = LoadConfig(**{**asdict(cfg), "requests": a.requests,
                            "near_capacity": min(cfg.near_capacity, a.requests)})
    if a.url and not a.url.startswith(("http://127.0.0.1", "http://localhost")):
        ap.error(f"--url {a.url!r}: the load test talks to 127.0.0.1 only")
    out = Path(a.out) if a.out else RESULTS / ("load-quick.json" if a.quick else "load.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if a.url:
        result = run_load(a.url, cfg)
    else:
        from sphkv_sglang.server_process import ServerProcess

        log = out.with_suffix(".server.log")
        with ServerProcess(MODEL, args=server_args(cfg), log_path=log, env={"SPHKV_DEBUG_POISON": "1"}) as srv:
            result = run_load(srv.url, cfg)
            result["server_start_s"] = round(srv.start_seconds, 1)
        result["server_log"] = str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    result["passed"] = passed(result)
    out.write_text(json.dumps(result, indent=1))
    keys = ("requests", "errors", "p50_ms", "p99_ms", "max_concurrent", "leaked_pages", "leaked_pages_idle",
            "demoted_pages", "evicted_pages", "duration_s", "wall_s", "passed")
    print(json.dumps({k: result.get(k) for k in keys}))
    print(f"wrote {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
