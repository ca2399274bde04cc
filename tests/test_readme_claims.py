# SPDX-License-Identifier: Apache-2.0
"""Every number in the README's result tables and result sentences matches a committed results file.

Data-driven, so a rewritten README section needs one entry here, not new code:

* ``TABLES``: a README table (found by a substring of the heading above it) → a results file and a
  function ``cell(data, row_label, column_header) -> [expected numbers]``. Every number printed in a
  cell (``4,608``, ``−3.1355``, ``+0.12%``, ``1.17×``, ``3/3, 2/3``, ``17,792 (3.86×)``) is compared, in
  order, with the expected list, to the precision printed (half a unit of the last printed digit,
  plus a small relative slack). A row or column the function does not know fails: a number with no
  source is a failure, not a skip. A README table that holds numbers but has no entry fails too.
* ``SENTENCES``: a regex over the README text whose groups are numbers → a results file and the
  expected values, same comparison. A sentence that no longer matches fails (update the entry
  with the text).

Run: ``pytest -q tests/test_readme_claims.py`` (no model, no server; < 1 s).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"

_NUM = re.compile(r"(?<![\w.\-])[−\-+]?\d[\d,]*(?:\.\d+)?")


# -- parsing --------------------------------------------------------------------------------------------
def numbers(text: str) -> list[tuple[float, int]]:
    """Numbers in ``text`` with their printed decimals (``−`` is a minus; ``4,608`` is 4608)."""
    out = []
    for m in _NUM.finditer(text):
        s = m.group().replace("−", "-").replace(",", "").replace("+", "")
        dec = len(s.split(".")[1]) if "." in s else 0
        out.append((float(s), dec))
    return out


@dataclass
class Table:
    heading: str
    header: list[str]
    rows: list[list[str]]
    line: int


def tables(md: str) -> list[Table]:
    out, heading, lines = [], "", md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s\-|:]+\|$", lines[i + 1]):
            cells = lambda s: [c.strip() for c in s.strip().strip("|").split("|")]   # noqa: E731
            header, rows, start = cells(line), [], i + 1
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            out.append(Table(heading, header, rows, start))
            continue
        i += 1
    return out


@lru_cache(maxsize=None)
def load(name: str):
    return json.loads((RESULTS / name).read_text())


def close(printed: float, dec: int, want: float) -> bool:
    return abs(printed - want) <= 0.5 * 10 ** -dec + 1e-9 + 0.002 * abs(want)


def compare(where: str, text: str, want: list[float]) -> list[str]:
    got = numbers(text)
    if len(got) == 1 and len(want) > 1 and all(close(got[0][0], got[0][1], w) for w in want):
        return []                                   # one printed value standing for equal values ("16")
    if len(got) != len(want):
        return [f"{where}: {text!r} has {len(got)} numbers, the source gives {len(want)}: {want}"]
    return [f"{where}: {text!r}: printed {g} but the source gives {w:.6g}"
            for (g, d), w in zip(got, want) if not close(g, d, w)]


# -- sources ----------------------------------------------------------------------------------------------
def method_key(label: str) -> str:
    """README method label → results ``method``: ``**ADA + RDR @ 25%**`` → ``ada+rdr@0.25``."""
    s = re.sub(r"\(.*?\)", "", label.replace("*", "")).strip().lower()
    s = re.sub(r"^ada (sphkv)", r"\1", s)
    s = re.sub(r"\s*@\s*(\d+)%", lambda m: f"@{int(m.group(1)) / 100:.2f}", s)
    s = s.replace(" + ", "+").replace(" ", "")
    return {"fullbf16": "full"}.get(s, s)


def quality_rows(name: str, label: str, corpus: str | None = None, model: str = "smollm2") -> dict[int, dict]:
    rows = {r["context"]: r for r in load(name) if r["method"] == method_key(label)
            and (corpus is None or r.get("corpus", "essays") == corpus) and r.get("model", "smollm2") == model}
    if not rows:
        raise KeyError(f"method {method_key(label)!r} (README row {label!r}) is not in {name}")
    return rows


def pairs_cell(label: str, col: str) -> list[float]:
    """The "every pair" quality table: row ``<model> <method> <what>`` (``what``: "vs the model's own NLL" →
    ``model_nll_delta_pct`` of that row; "needles" → single-needle hits of 8; "ΔNLL" → ``nll_delta_pct``), column ``<corpus> <n>K``."""
    model, method = label.replace("`", "").split()[:2]
    corpus, k = re.match(r"(\w+) (\d)K$", col).groups()
    r = quality_rows("quality-quick.json", method, corpus, model)[int(k) * 1024]
    if "own" in label:
        return [r["model_nll_delta_pct"]]
    if "needle" in label:
        return [sum(r["needle_hits"]), len(r["needle_hits"])]
    if "ΔNLL" in label:
        return [r["nll_delta_pct"]]
    raise KeyError(f"row {label!r}")


def quality_cell(name: str, model: str = "smollm2") -> Callable:
    def cell(label: str, col: str) -> list[float]:
        m = re.match(r"(\w+) (\d)K$", col)
        if m and not col.startswith("ΔNLL"):              # "<corpus> 2K": ΔNLL, retrieval hits / cases
            r = quality_rows(name, label, m.group(1), model)[int(m.group(2)) * 1024]
            return [r["nll_delta_pct"], round(r["retrieval_rate"] * r["retrieval_cases"]), r["retrieval_cases"]]
        rows = quality_rows(name, label, "essays", model)
        ctx = sorted(rows)
        if col.startswith("bits/visible"):                    # window-only rows: bits per visible element
            return sorted({round(r["bits_per_visible_element"], 2) for r in load(name)
                           if r["method"] == method_key(label) and r.get("model", "smollm2") == model
                           and "bits_per_visible_element" in r})
        if col.startswith("bits"):
            if "corpus" not in rows[ctx[0]]:                 # one corpus: bits per context, in context order
                return [rows[c]["bits_per_element"] for c in ctx]
            return sorted({round(r["bits_per_element"], 2) for r in load(name) if r["method"] == method_key(label)
                           and r.get("model", "smollm2") == model})

        m = re.match(r"ΔNLL (\d)K", col)
        if m:
            return [rows[int(m.group(1)) * 1024]["nll_delta_pct"]]
        if col.startswith("needle"):
            return [x for c in ctx for x in (sum(rows[c]["needle_hits"]), len(rows[c]["needle_hits"]))]
        if col.startswith("answer NLL"):
            return [rows[c]["answer_nll"] for c in ctx]
        raise KeyError(f"column {col!r}")
    return cell


SERVING_ROWS = {   # README row label (prefix) → (field, ratio field in vs_dense or None, scale of the ratio)
    "`max_total_num_tokens`": ("max_total_num_tokens", "capacity_x", 1),
    "`bench_output_tok_s`": ("bench_output_tok_s", "bench_output_tok_s_x", 1),
    "`bench_mean_itl_ms`": ("bench_mean_itl_ms", None, 1),
    "`bench_mean_ttft_ms`": ("bench_mean_ttft_ms", None, 1),
    "`bench_prefix_output_tok_s`": ("bench_prefix_output_tok_s", "bench_prefix_output_tok_s_x", 1),
    "`bench_kvbound_output_tok_s`": ("bench_kvbound_output_tok_s", "bench_kvbound_output_tok_s_x", 1),
    "`bench_kvbound_running_req`": ("bench_kvbound_running_req", "bench_kvbound_running_req_x", 1),
    "`bench_kvbound_mean_itl_ms`": ("bench_kvbound_mean_itl_ms", None, 1),
    "`bench_kvbound_mean_ttft_ms`": ("bench_kvbound_mean_ttft_ms", None, 1),
    "`bench_kvbound` output tokens per server CPU-second": ("bench_kvbound_output_tok_per_server_cpu_s",
                                                            "bench_kvbound_tok_per_server_cpu_s_x", 1),
    "continuation mean logprob": ("cont_logprob_mean", "cont_logprob_rel_diff", 100),
    "prefix hit rate": ("prefix_hit_rate", None, 1),
    "tokens per server CPU-second": ("total_tok_per_server_cpu_s", "tok_per_server_cpu_s_x", 1),
    "output tokens/s": ("throughput_tok_s", "throughput_x", 1),
}


def serving_cell(label: str, col: str) -> list[float]:
    mode = {"dense": "dense"}.get(col, "sphkv" if col.startswith("sphkv") else None)
    if mode is None:
        raise KeyError(f"column {col!r}")
    rec = next(r for r in load("serving-quick.json") if r["mode"] == mode)
    field, ratio, scale = next(v for k, v in SERVING_ROWS.items() if label.startswith(k))
    want = [rec[field]]
    if ratio and mode == "sphkv":
        want.append(scale * rec["vs_dense"][ratio])
    return want


def decode_cell(label: str, col: str) -> list[float]:
    b, ctx = (int(x) for x in re.match(r"(\d+) × (\d+)K", label).groups())
    row = next((r for r in load("decode.json")["rows"] if r["batch"] == b and r["context"] == ctx * 1024), None)
    if row is None:
        raise KeyError(f"decode row {label!r}")
    fields = {"ADA µs": [row["ada_us"]], "FI bf16-tc µs": [row["fi_bf16_tc_us"]], "FI fp8-tc µs": [row["fi_fp8_tc_us"]],
              "vs bf16-tc": [row["speedup_vs_bf16_tc"]], "vs fp8-tc": [row["speedup_vs_fp8_tc"]],
              "ADA % of copy bandwidth": [100 * row["copy_fraction"]]}
    return fields[col]


RETENTION_ROWS = {   # README "Bound-budget retention" table: label prefix -> field of the sphkv-<policy> row
    "prefix hit rate": "prefix_hit_rate", "continuation mean logprob": "cont_logprob_mean",
    "answers identical to dense": "answer_agreement", "answer tokens agreeing": "answer_token_agreement",
    "pages demoted": "pages_demoted", "tokens evicted": "evicted_tokens", "RDR plans": "rdr_plans",
}


def retention_cell(label: str, col: str) -> list[float]:
    """Columns ``dense`` (the reference values stored in each row) and ``sphkv-<policy>``."""
    rows = load("serving-quick.json")
    if col.startswith("dense"):
        rec = next(r for r in rows if r["mode"] == "sphkv-heuristic")
        dense = {"prefix hit rate": "dense_prefix_hit_rate", "continuation mean logprob": "cont_logprob_dense"}
        return [rec[f] for k, f in dense.items() if label.startswith(k)]
    rec = next(r for r in rows if r["mode"] == col.strip("`"))
    field = next(v for k, v in RETENTION_ROWS.items() if label.startswith(k))
    return [] if field == "rdr_plans" and rec["retention"] != "rdr" else [rec[field] or 0]


@dataclass(frozen=True)
class TableSpec:
    heading: str                        # substring of the heading above the table
    source: str                         # results file(s), for messages
    cell: Callable[[str, str], list[float]]
    first_header: str | None = None     # when two tables share a heading: the first header cell
    readme: str = "README.md"           # which README (relative to the repository root)


PLUGIN_SERVING_ROWS = {   # sphkv_sglang/README.md "Measured" table: label prefix -> fields
    "`max_total_num_tokens`": lambda r, m: [r["max_total_num_tokens"]] + (
        [r["vs_dense"]["capacity_x"], r["sphkv_stats"]["staging_pages"]] if m == "sphkv" else []),
    "`bench_output_tok_s`": lambda r, m: [r["bench_output_tok_s"]] + (
        [r["vs_dense"]["bench_output_tok_s_x"]] if m == "sphkv" else []),
    "`bench_prefix_output_tok_s`": lambda r, m: [r["bench_prefix_output_tok_s"]] + (
        [r["vs_dense"]["bench_prefix_output_tok_s_x"]] if m == "sphkv" else []),
    "`bench_kvbound_output_tok_s`": lambda r, m: [r["bench_kvbound_output_tok_s"]] + (
        [r["vs_dense"]["bench_kvbound_output_tok_s_x"]] if m == "sphkv" else []),
    "`bench_kvbound_running_req`": lambda r, m: [r["bench_kvbound_running_req"]] + (
        [r["vs_dense"]["bench_kvbound_running_req_x"]] if m == "sphkv" else []),
    "continuation mean logprob": lambda r, m: [r["cont_logprob_mean"]] + (
        [100 * r["vs_dense"]["cont_logprob_rel_diff"]] if m == "sphkv" else []),
    "prefix hit rate": lambda r, m: [r["prefix_hit_rate"]],
    "pages demoted": lambda r, m: [r["pages_demoted"]],
    "tokens per server CPU-second": lambda r, m: [r["total_tok_per_server_cpu_s"]] + (
        [r["vs_dense"]["tok_per_server_cpu_s_x"]] if m == "sphkv" else []),
    "output tokens / s": lambda r, m: [r["throughput_tok_s"]] + ([r["vs_dense"]["throughput_x"]] if m == "sphkv" else []),
    "mean TTFT": lambda r, m: [r["ttft_mean_s"]],
    "one stream": lambda r, m: [r["single_stream_tok_s"]],
    "server start": lambda r, m: [r["start_s"]],
}


def plugin_serving_cell(label: str, col: str) -> list[float]:
    mode = "dense" if col == "dense" else "sphkv" if col.startswith("sphkv") else None
    rec = next(r for r in load("serving-quick.json") if r["mode"] == mode)
    return next(fn for k, fn in PLUGIN_SERVING_ROWS.items() if label.startswith(k))(rec, mode)


TABLES = [
    TableSpec("Quality — SmolLM2-135M-Instruct", "quality-quick.json", quality_cell("quality-quick.json")),
    TableSpec("Quality — SmolLM2-135M-Instruct", "quality.json", quality_cell("quality.json"),
              first_header="method (full run)"),
    TableSpec("Quality — Gemma 3 270M", "quality-quick.json", quality_cell("quality-quick.json", model="gemma3")),
    TableSpec("Quality — Gemma 3 270M", "quality-quick.json", pairs_cell, first_header="model, method, measure"),
    TableSpec("Serving — real SGLang servers", "serving-quick.json", serving_cell),
    TableSpec("Decode kernel — H200", "decode.json", decode_cell),
    TableSpec("Measured (SmolLM2-135M-Instruct, CPU engine", "serving-quick.json", plugin_serving_cell,
              readme="sphkv_sglang/README.md"),
    TableSpec("Bound-budget retention", "serving-quick.json", retention_cell),
]


def _quality(name, method, ctx, field="nll_delta_pct"):
    return next(r[field] for r in load(name) if r["method"] == method and r["context"] == ctx)


def _planning_ms():
    ms = [r["plan_ms_per_1k"] for r in load("planning.json")["rows"] if "plan_ms_per_1k" in r]
    return [min(ms), max(ms)]


@dataclass(frozen=True)
class Sentence:
    pattern: str                        # regex over the README (whitespace-insensitive); groups = numbers
    source: str
    want: Callable[[], list[float]]
    readme: str = "README.md"


SENTENCES = [
    Sentence(r"dense server `--max-total-tokens (\d+)` vs sphkv server `--sphkv-budget` = the same ([\d.]+) MiB, "
             r"both `--max-running-requests (\d+)`; (\d+) conversations x (\d+) interleaved turns sharing a (\d+)K-token "
             r"system prompt \((\d+)-token essay passages, (\d+)-token answers, (\d+) in flight\); quality = input "
             r"log-probs of the (\d+) true tokens after a cached (\d+)K-token essay prefix", "serving-quick.json",
             lambda: [(w := load("serving-quick.json")[0]["workload"])["dense_tokens"],
                      load("serving-quick.json")[0]["kv_budget_bytes"] / 2 ** 20, w["max_running_requests"],
                      w["conversations"], w["turns"], w["system_tokens"] / 1024, w["user_tokens"], w["answer_tokens"],
                      w["concurrency"], w["continuation"], w["context"] / 1024],
             readme="sphkv_sglang/README.md"),
    Sentence(r"Same KV memory \((\d+) MiB\) for both; (\d+) conversations × (\d+) turns sharing a (\d+)K-token system "
             r"prompt; continuation quality read through a cached (\d+)K essay prefix", "serving-quick.json",
             lambda: [load("serving-quick.json")[1]["kv_budget_bytes"] / 2 ** 20,
                      *(load("serving-quick.json")[1]["workload"][k] for k in ("conversations", "turns")),
                      load("serving-quick.json")[1]["workload"]["system_tokens"] / 1024,
                      load("serving-quick.json")[1]["workload"]["context"] / 1024]),
    Sentence(r"ADA's NLL change is ([\d.]+)× smaller than the rotated scalar code's \(turbo-2\) at 2K", "quality.json",
             lambda: [_quality("quality.json", "turbo-2", 2048) / _quality("quality.json", "sphkv-2b-lo+sink", 2048)]),
    Sentence(r"more bits \(([+−\-][\d.]+)% vs ([+−\-][\d.]+)% at 2K; at 4K ([+−\-][\d.]+)% vs ([+−\-][\d.]+)%", "quality.json",
             lambda: [_quality("quality.json", m, c) for c in (2048, 4096) for m in ("sphkv-2b+sink", "kivi-2")]),
    Sentence(r"KIVI-3 \(better at 2K with ~([\d.]+) more bits\)", "quality.json",
             lambda: [_quality("quality.json", "kivi-3", 2048, "bits_per_element")
                      - _quality("quality.json", "sphkv-3b+sink", 2048, "bits_per_element")]),
    Sentence(r"sphkv-4 at ([\d.]+) bits/elem", "decode.json", lambda: [load("decode.json")["rows"][0]["bits_per_element"]]),
    Sentence(r"Load test \(`make load-quick`, (\d[\d,]*)-token pool of (\d+)-token pages[^)]*\): ([\d,]+) requests "
             r"\(up to (\d+) concurrent, prompts of (\d+)–(\d+) tokens[^)]*\), (\d+) errors, (\d+) leaked pages after "
             r"flush, ([\d,]+) pages demoted, ([\d,]+) evicted; p50 ([\d.]+) s, p99 ([\d.]+) s", "load-quick.json",
             lambda: [(r := load("load-quick.json"))["pool_tokens"], r["config"]["page_size"], r["requests"],
                      r["max_concurrent"], r["prompt_tokens"]["min"], r["prompt_tokens"]["max"], r["errors"],
                      r["leaked_pages"], r["demoted_pages"], r["evicted_pages"], r["p50_ms"] / 1000,
                      r["p99_ms"] / 1000]),
]


# -- tests ----------------------------------------------------------------------------------------------
def _readme(name: str = "README.md") -> str:
    return (ROOT / name).read_text()


READMES = sorted({spec.readme for spec in TABLES} | {"README.md"})


def _spec_for(t: Table, readme: str = "README.md") -> TableSpec | None:
    for spec in sorted(TABLES, key=lambda sp: sp.first_header is None):     # the specific entry first
        if spec.readme == readme and spec.heading in t.heading and (spec.first_header is None or t.header[0] == spec.first_header):
            return spec
    return None


def test_number_parser():
    assert [v for v, _ in numbers("17,792 (3.86×)")] == [17792, 3.86]
    assert numbers("−3.1355") == [(-3.1355, 4)] and numbers("+0.12%") == [(0.12, 2)]
    assert [v for v, _ in numbers("3/3, 2/3")] == [3, 3, 2, 3]
    assert method_key("**ADA + RDR @ 25%**") == "ada+rdr@0.25" and method_key("**ADA sphkv-3b+sink**") == "sphkv-3b+sink"
    assert method_key("turbo-4 (rotation + Lloyd-Max scalar)") == "turbo-4" and method_key("full bf16") == "full"
    assert close(0.83, 2, 0.8303) and not close(0.88, 2, 0.8303) and compare("x", "4–8×", [4, 8]) == []


def test_checker_catches_a_wrong_number():
    spec = TABLES[0]
    assert compare("q", "+0.06%, 13/24", spec.cell("sphkv-4b+sink", "essays 2K")) == []
    assert compare("q", "+0.16%, 13/24", spec.cell("sphkv-4b+sink", "essays 2K"))
    assert compare("q", "+0.06%, 12/24", spec.cell("sphkv-4b+sink", "essays 2K"))
    with pytest.raises(KeyError):
        spec.cell("made-up-method", "essays 2K")


def test_every_numeric_table_has_a_source():
    missing = []
    for t in tables(_readme()):
        has_numbers = any(numbers(c) for row in t.rows for c in row[1:])
        if has_numbers and _spec_for(t) is None:
            missing.append(f"README line {t.line}: table under {t.heading!r} ({t.header[:3]}...)")
    assert not missing, "numeric tables without a results source (add a TableSpec):\n" + "\n".join(missing)


@pytest.mark.parametrize("readme", READMES)
def test_table_numbers_match_results(readme):
    errors, checked = [], 0
    for t in tables(_readme(readme)):
        spec = _spec_for(t, readme)
        if spec is None:
            continue
        for row in t.rows:
            for col, text in zip(t.header[1:], row[1:]):
                if not numbers(text):
                    continue
                where = f"{readme} line {t.line} [{row[0]} | {col}] vs {spec.source}"
                try:
                    want = spec.cell(row[0], col)
                except (KeyError, StopIteration, AttributeError) as e:
                    errors.append(f"{where}: no source for this number ({e})")
                    continue
                errors += compare(where, text, want)
                checked += 1
    assert checked >= (80 if readme == "README.md" else 15), checked
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("sentence", SENTENCES, ids=lambda s: s.pattern[:40])
def test_sentence_numbers_match_results(sentence):
    text = re.sub(r"\s+", " ", _readme(sentence.readme))
    m = re.search(sentence.pattern, text)
    assert m, f"README no longer says {sentence.pattern!r}: update SENTENCES in {__file__}"
    want = sentence.want()
    errors = compare(f"README sentence vs {sentence.source}", " ".join(m.groups()), want)
    assert not errors, "\n".join(errors)


def test_results_files_referenced_by_readme_exist():
    for path in re.findall(r"\]\((benchmarks/results/[^)]+)\)", _readme()):
        assert (ROOT / path).is_file(), path
        if path.endswith(".json"):
            json.loads((ROOT / path).read_text())
    assert math.isfinite(1.0)
