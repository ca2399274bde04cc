# SPDX-License-Identifier: Apache-2.0
"""Load test of a sphkv server: concurrent multi-turn chats under memory pressure, plus faults.

``python -m benchmarks.serving.load [--quick] [--url URL] [--duration S] [--out PATH]``
(``make load-quick``). Without ``--url`` it starts a real sphkv server on 127.0.0.1
(SmolLM2-135M-Instruct, ``--max-total-tokens`` small enough that the conversations do not fit
together: the top tier fills, cold radix nodes are demoted, then evicted) with freed-page poisoning
on (``SPHKV_DEBUG_POISON=1``: a read after free fails the request), and stops it afterwards.

1. **load** — ``conversations`` threads, each a multi-turn chat (a shared system prompt, its own
   user turns, greedy answers of ``answer_tokens``) through ``/v1/chat/completions``, back to back
   for ``duration_s`` seconds; a conversation whose prompt passes ``restart_tokens`` starts over.
   A sampler thread records the pool occupancy (``/get_server_info``) every ``sample_s``.
2. **faults** — a streaming request whose client closes the connection after a few chunks, and
   requests aborted through ``/abort_request`` while they run; the server must free their pages.
3. **accounting** — once idle, every coded page must belong to the radix tree and no staging slot
   may be held (``leaked_pages_idle``); after ``/flush_cache`` every page must be free
   (``leaked_pages``).

Writes ``benchmarks/results/load-quick.json`` (or ``load.json``) with ``requests``, ``errors``,
``p50_ms``, ``p99_ms``, ``leaked_pages``, ``leaked_pages_idle``, ``occupancy`` and more. Bounded in
count and time; talks to 127.0.0.1 only. Exit status 1 if the bar (zero errors, zero leaked pages)
is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = Path(os.environ.get("SPHKV_MODEL", ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"))

__all__ = ["LoadConfig", "QUICK", "SHORT", "run_load", "server_args", "main"]


@dataclass(frozen=True)
class LoadConfig:
    """Shape of one load run (all counts > 0).

    Parameters
    ----------
    conversations : concurrent chat threads.
    duration_s : seconds of load (requests in flight at the deadline finish).
    answer_tokens : ``max_tokens`` of each answer (greedy).
    system_sentences, user_sentences : prompt sizes (a sentence is ~12 tokens).
    restart_tokens : a conversation whose prompt passes this starts over.
    max_total_tokens : the server's KV pool in tokens (``--max-total-tokens``).
    max_running_requests : the server's ``--max-running-requests``.
    sample_s : pool occupancy sampling period.
    aborts : requests aborted through ``/abort_request`` (the fault case), plus one closed stream.
    request_timeout_s : per-request timeout (a timeout counts as an error).
    """

    conversations: int = 6
    duration_s: float = 120.0
    answer_tokens: int = 24
    system_sentences: int = 30
    user_sentences: int = 12
    restart_tokens: int = 1100
    max_total_tokens: int = 2048
    max_running_requests: int = 8
    sample_s: float = 1.0
    aborts: int = 2
    request_timeout_s: float = 180.0

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"{name}={value!r} must be > 0")
        if self.restart_tokens + self.answer_tokens + 200 > self.max_total_tokens:
            raise ValueError(f"restart_tokens={self.restart_tokens} + answer_tokens + 200 must fit "
                             f"max_total_tokens={self.max_total_tokens}")


QUICK = LoadConfig(conversations=4, duration_s=45.0)
SHORT = LoadConfig(conversations=3, duration_s=20.0, answer_tokens=12, user_sentences=10, aborts=1)


def server_args(cfg: LoadConfig) -> list[str]:
    return ["--max-total-tokens", str(cfg.max_total_tokens), "--max-running-requests",
            str(cfg.max_running_requests), "--enable-cache-report"]


# -- prompts ------------------------------------------------------------------------------------------
_WORDS = ("river mountain lantern harbor violet copper meadow signal orbit canyon ember falcon garden "
          "glacier island jasmine kettle ledger marble nectar oasis pepper quartz saffron timber velvet").split()


def _sentence(seed: int) -> str:
    w = [_WORDS[(seed * 7 + i * 13) % len(_WORDS)] for i in range(9)]
    return f"Note {seed}: the {w[0]} near the {w[1]} keeps {w[2]} {w[3]} and {w[4]} for the {w[5]} {w[6]}."


SYSTEM = "You are a concise assistant. Remember these notes. " + " ".join(_sentence(i) for i in range(30))


def _user(conv: int, turn: int, n: int) -> str:
    base = 1000 * (conv + 1) + 50 * turn
    return " ".join(_sentence(base + i) for i in range(n)) + f" Question {turn}: summarise note {base}."


# -- server statistics ----------------------------------------------------------------------------------
def pool_stats(url: str) -> dict:
    info = requests.get(url + "/get_server_info", timeout=60).json()
    return info["internal_states"][0]["sphkv"]


def _occupancy(s: dict) -> dict:
    return dict(coded_pages=s["coded_pages"], free_phys_pages=s["free_phys_pages"], staging_in_use=s["staging_in_use"],
                tree_tokens=s.get("tree_tokens"), protected_tokens=s.get("protected_tokens"),
                pages_demoted=s["pages_demoted"], pages_released=s["pages_released"])


def leaked(s: dict, *, idle: bool) -> int:
    """Pages held that nothing owns: idle → coded pages outside the tree + staging slots; after a
    flush → every coded page, staging slot or used physical page."""
    coded, staging = sum(s["coded_pages"]), s["staging_in_use"]
    if idle:
        return max(0, coded - (s.get("tree_tokens") or 0) // s["page_size"]) + staging
    return coded + staging + sum(s["phys_pages"]) - sum(s["free_phys_pages"])


# -- load -----------------------------------------------------------------------------------------------
def _conversation(url: str, cfg: LoadConfig, conv: int, deadline: float, out: list, lock: threading.Lock):
    messages, turn, session = [{"role": "system", "content": SYSTEM}], 0, requests.Session()
    while time.monotonic() < deadline:
        messages.append({"role": "user", "content": _user(conv, turn, cfg.user_sentences)})
        t0 = time.perf_counter()
        rec = dict(conv=conv, turn=turn)
        try:
            r = session.post(url + "/v1/chat/completions", timeout=cfg.request_timeout_s, json={
                "model": "default", "messages": messages, "max_tokens": cfg.answer_tokens, "temperature": 0})
            rec["ms"] = 1000 * (time.perf_counter() - t0)
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {r.text[:300]}"
            else:
                body = r.json()
                answer = body["choices"][0]["message"]["content"]
                usage = body.get("usage") or {}
                rec.update(prompt_tokens=usage.get("prompt_tokens", 0),
                           cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
                messages.append({"role": "assistant", "content": answer})
        except Exception as e:                                       # noqa: BLE001 - every failure is recorded
            rec["ms"] = 1000 * (time.perf_counter() - t0)
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
        with lock:
            out.append(rec)
        turn += 1
        if "error" in rec:
            messages.pop()
        if rec.get("prompt_tokens", 0) > cfg.restart_tokens:
            messages, turn = [{"role": "system", "content": SYSTEM}], 0


def _sampler(url: str, cfg: LoadConfig, stop: threading.Event, out: list, t0: float):
    while not stop.is_set():
        try:
            out.append(dict(t=round(time.monotonic() - t0, 2), **_occupancy(pool_stats(url))))
        except Exception as e:                                       # noqa: BLE001
            out.append(dict(t=round(time.monotonic() - t0, 2), error=str(e)[:200]))
        stop.wait(cfg.sample_s)


# -- faults ---------------------------------------------------------------------------------------------
def _closed_stream(url: str) -> dict:
    """Start a long streaming request, read two chunks, close the connection."""
    chunks = 0
    with requests.post(url + "/generate", stream=True, timeout=120, json={
            "text": SYSTEM + " Tell a very long story.", "stream": True,
            "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}}) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                chunks += 1
            if chunks >= 2:
                break
    return dict(kind="closed_stream", chunks_read=chunks)


def _aborted(url: str) -> dict:
    """Start a long request with a known rid, abort it through ``/abort_request`` while it runs."""
    rid = "load-abort-" + uuid.uuid4().hex[:8]
    res: dict = {}

    def call():
        try:
            r = requests.post(url + "/generate", timeout=120, json={
                "rid": rid, "text": SYSTEM + " Write a long essay.",
                "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}})
            res.update(status=r.status_code, finish=(r.json().get("meta_info") or {}).get("finish_reason")
                       if r.headers.get("content-type", "").startswith("application/json") else None)
        except Exception as e:                                       # noqa: BLE001
            res.update(error=str(e)[:200])

    th = threading.Thread(target=call)
    th.start()
    time.sleep(1.5)
    a = requests.post(url + "/abort_request", json={"rid": rid}, timeout=30)
    th.join(130)
    return dict(kind="abort", rid=rid, abort_status=a.status_code, **res)


def _wait_idle(url: str, timeout: float = 60.0) -> dict:
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


def run_load(url: str, cfg: LoadConfig) -> dict:
    """Run the load, the faults and the accounting against the server at ``url``; return the record."""
    _flush(url)
    start = pool_stats(url)
    records: list[dict] = []
    samples: list[dict] = []
    lock, stop = threading.Lock(), threading.Event()
    t0 = time.monotonic()
    deadline = t0 + cfg.duration_s
    sampler = threading.Thread(target=_sampler, args=(url, cfg, stop, samples, t0), daemon=True)
    sampler.start()
    threads = [threading.Thread(target=_conversation, args=(url, cfg, c, deadline, records, lock))
               for c in range(cfg.conversations)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(cfg.duration_s + cfg.request_timeout_s + 30)
    load_s = time.monotonic() - t0
    faults = [_closed_stream(url)] + [_aborted(url) for _ in range(cfg.aborts)]
    stop.set()
    sampler.join(10)
    idle = _wait_idle(url)
    after_load = _occupancy(idle)
    flushed = _flush(url)
    final = pool_stats(url)
    ok = [r for r in records if "error" not in r]
    lat = sorted(r["ms"] for r in ok)
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None   # noqa: E731
    result = dict(
        config=asdict(cfg), url=url, duration_s=round(load_s, 1),
        requests=len(ok), errors=len(records) - len(ok),
        error_samples=[r["error"] for r in records if "error" in r][:5],
        p50_ms=pct(0.50), p99_ms=pct(0.99), mean_ms=round(statistics.fmean(lat), 1) if lat else None,
        requests_per_s=round(len(ok) / load_s, 2),
        prompt_tokens_max=max((r.get("prompt_tokens", 0) for r in ok), default=0),
        cached_token_share=round(sum(r.get("cached_tokens", 0) for r in ok)
                                 / max(1, sum(r.get("prompt_tokens", 0) for r in ok)), 3),
        pages_demoted=final["pages_demoted"] - start["pages_demoted"],
        pages_released=final["pages_released"] - start["pages_released"],
        nonfinite_rows=final["nonfinite_rows"] - start["nonfinite_rows"],
        peak_coded_pages=max((sum(s["coded_pages"]) for s in samples if "coded_pages" in s), default=0),
        logical_pages=cfg.max_total_tokens // start["page_size"], phys_pages=start["phys_pages"],
        faults=faults, after_load_idle=after_load, leaked_pages_idle=leaked(idle, idle=True),
        flushed=flushed, after_flush=_occupancy(final),
        leaked_pages=leaked(final, idle=False) if flushed else None,
        occupancy=samples)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="45 s, 4 conversations (make load-quick)")
    ap.add_argument("--url", default=None, help="an already running sphkv server on 127.0.0.1")
    ap.add_argument("--duration", type=float, default=None, help="seconds of load (overrides the mode's)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/load[-quick].json)")
    a = ap.parse_args(argv)
    cfg = QUICK if a.quick else LoadConfig()
    if a.duration is not None:
        cfg = LoadConfig(**{**asdict(cfg), "duration_s": a.duration})
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
    out.write_text(json.dumps(result, indent=1))
    keys = ("requests", "errors", "p50_ms", "p99_ms", "leaked_pages", "leaked_pages_idle", "pages_demoted",
            "pages_released", "duration_s", "wall_s")
    print(json.dumps({k: result.get(k) for k in keys}))
    print(f"wrote {out}")
    return 0 if result["errors"] == 0 and result["leaked_pages"] == 0 and result["leaked_pages_idle"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
