# SPDX-License-Identifier: Apache-2.0
"""Assemble ``benchmarks/results/decode.json`` / ``decode.md`` from the committed raw results of the H200 calls.

Run 9 (third session) adds the extra shapes at 8 x 32K (GQA 8, head_dim 64 and 256) as complete same-run rows.
Runs 6 and 7 (2026-12-02, second session): both wrote partial JSON (``decode_h200_run{6,7}.json``, the sweep's
``decode.partial.json``); run 7's sweep was cut after timing ADA at its last shape, whose numbers are parsed from
the log (:func:`_tail_shape`). :func:`main` says which row comes from where. (Runs 4-5 were assembled the same way by
this script's previous version; :func:`parse_log` reads a printed table.) Derived fields are recomputed with the
formulas of ``bench_decode.py``. CPU only::

    python benchmarks/kernels/assemble_decode.py
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT))

from benchmarks.kernels.bench_decode import coded_tier, write_markdown  # noqa: E402
from sphkv.pool import TierPool  # noqa: E402

RES = _ROOT / "benchmarks" / "results"
ROW = re.compile(r"^\s+(\d+)x(\d+)K (\d+)/(\d+)/(\d+) \|\s+([\d.]+)\s+([\d.]+)% \|\s+(\S+)\s+(\S+)\s+(\S+) \|"
                 r"\s+(\S+?)x?\s+(\S+?)x? \|\s+(\S+)\s+(\S+)\s*$")
COPY = re.compile(r"device-to-device copy: (\d+) GB/s")


def _num(s: str):
    return None if s == "n/a" else float(s)


def ada_bytes(batch: int, ctx: int, hq: int, hkv: int, d: int, preset: str = "sphkv-4", page_size: int = 64) -> int:
    """Bytes one ADA decode step reads and writes (``bench_decode.ada_case`` + queries/outputs)."""
    tier = coded_tier(preset, page_size, d)
    pool = TierPool(tier, 2, head_dim=d, page_size=page_size)
    rows, ppr = batch * hkv, ctx // page_size
    per_token = pool.kcodec.code_bytes + 2 + pool.vquant.code_bytes + 4 * pool.v_scale.shape[-1]
    return rows * ctx * per_token + rows * ppr * 2 * d + 2 * batch * hq * d * 2


def parse_log(path: Path, run: str) -> tuple[float, list[dict]]:
    """Rows of a ``bench_decode`` log: each table line, with the breakdown line printed before it."""
    copy, rows, pending = None, [], {}
    for line in path.read_text().splitlines():
        if (m := COPY.search(line)):
            copy = float(m.group(1))
        if line.strip().startswith("breakdown:"):
            pending = ast.literal_eval(line.split("breakdown:", 1)[1].strip())
            continue
        m = ROW.match(line)
        if not m:
            continue
        b, ck, hq, hkv, d = (int(x) for x in m.groups()[:5])
        ada, pct = float(m.group(6)), float(m.group(7))
        fi, fi_tc, fi_fp8 = (_num(x) for x in m.groups()[7:10])
        tri, sdpa = _num(m.group(13)), _num(m.group(14))
        tier = coded_tier("sphkv-4", 64, d)
        nbytes = ada_bytes(b, ck * 1024, hq, hkv, d)
        gbs = nbytes / (ada * 1e-6) / 1e9
        assert abs(100 * gbs / copy - pct) < 0.06, f"{line!r}: recomputed {100 * gbs / copy:.2f}% of copy"
        row = dict(device="NVIDIA H200", batch=b, context=ck * 1024, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d,
                   preset="sphkv-4", page_size=64, bits_per_element=round(tier.bytes_per_token(d, 64) * 8 / (2 * d), 4),
                   ada_us=ada, ada_kernel="rowwise", ada_options={}, ada_bytes=nbytes, **pending,
                   triton_bf16_us=tri, sdpa_us=sdpa, bf16_bytes=b * ck * 1024 * hkv * d * 4 + 2 * b * hq * d * 2,
                   fi_bf16_us=fi, fi_bf16_tc_us=fi_tc, fi_fp8_tc_us=fi_fp8)
        for key, base in (("speedup_vs_bf16", "fi_bf16_us"), ("speedup_vs_bf16_tc", "fi_bf16_tc_us"),
                          ("speedup_vs_fp8_tc", "fi_fp8_tc_us"), ("speedup_vs_triton_bf16", "triton_bf16_us"),
                          ("speedup_vs_sdpa", "sdpa_us")):
            row[key] = round(row[base] / ada, 3) if row[base] else None
        row.update(gb_s=round(gbs, 1), copy_gb_s=copy, copy_fraction=round(gbs / copy, 3), run=run,
                   source=f"{path.name} (printed table; µs to 0.1)")
        if fi_tc:
            row["fi_bf16_tc_gb_s"] = round(row["bf16_bytes"] / (fi_tc * 1e-6) / 1e9, 1)
        rows.append(row)
        pending = {}
    return copy, rows


LAST_ROW = re.compile(r"\(row: ([\d.]+)\)")


def _derive(row: dict) -> dict:
    """Recompute a row's speedups, GB/s and copy fraction (``bench_decode.measure_row``'s formulas)."""
    ada = row["ada_us"]
    for key, base in (("speedup_vs_bf16", "fi_bf16_us"), ("speedup_vs_bf16_tc", "fi_bf16_tc_us"),
                      ("speedup_vs_fp8_tc", "fi_fp8_tc_us"), ("speedup_vs_triton_bf16", "triton_bf16_us"),
                      ("speedup_vs_sdpa", "sdpa_us")):
        row[key] = round(row[base] / ada, 3) if ada and row.get(base) else None
    row["gb_s"] = round(row["ada_bytes"] / (ada * 1e-6) / 1e9, 1)
    row["copy_fraction"] = round(row["gb_s"] / row["copy_gb_s"], 3)
    return row


def _tail_shape(log: Path) -> dict:
    """The ADA time (the ``(row: X)`` of its ``--compare`` lines) and breakdown of the shape a sweep was timing when
    its timeout killed it, before the FlashInfer baselines of that shape were printed."""
    text = log.read_text().splitlines()
    last_table = max(i for i, line in enumerate(text) if ROW.match(line))
    tail = text[last_table + 1:]
    ada = [float(m.group(1)) for line in tail if (m := LAST_ROW.search(line))]
    bd = [ast.literal_eval(line.split("breakdown:", 1)[1].strip()) for line in tail if "breakdown:" in line]
    cmp = {}
    for line in tail:
        if (m := re.match(r"^\s+(\{.*\}): ([\d.]+) us \(row: ", line)):
            cmp[m.group(1)] = float(m.group(2))
    return dict(ada_us=ada[-1], ada_us_compare=cmp, **(bd[-1] if bd else {}))


def main() -> int:
    """decode.json from H200 runs 6, 7 (2026-12-02, second session, calls 1 and 2; the per-row table launch), 9
    (third session, call 2: GQA 8 and head_dim 64/256 at 8 x 32K, FlashInfer in the same run) and 14 (fourth session:
    head_dim 256 with the tensor-core kernel, in a CUDA graph).

    run 7 (call 2, commit 7a138cc = the code in the tree): 1 x 8K/32K/128K, 8 x 32K, 32 x 32K with FlashInfer in the same
    run; its sweep was cut by its timeout after timing ADA at 8 x 32K head_dim 64 (``_tail_shape``), before that
    shape's baselines. run 6 (call 1, commit e89f843): the whole grid + GQA 8 + head_dim 64 with FlashInfer in the
    same run; same decode kernel and the same defaults at head_dim 128, except the table launch's first version (one
    4-warp program per row, tf32x3 dot; timed alone 12.7-13.2 us vs 12.9-15.4 us for the final one). Rows of run 6 are
    used for the shapes run 7 did not time; the head_dim-64 row takes run 7's ADA time (default now without row tables)
    and run 6's FlashInfer/Triton/SDPA times of the same shape (a different call on the same device)."""
    r6 = json.loads((RES / "decode_h200_run6.json").read_text())["rows"]
    r7 = json.loads((RES / "decode_h200_run7.json").read_text())["rows"]
    shape = lambda r: (r["batch"], r["context"], r["num_qo_heads"], r["num_kv_heads"], r["head_dim"])  # noqa: E731
    for r in r7:
        r["run"], r["source"] = "h200-run7", "decode_h200_run7.json (commit 7a138cc, the code in the tree)"
    done = {shape(r) for r in r7}
    rows = list(r7)
    tail = _tail_shape(RES / "decode_h200_run7.log")
    for r in r6:
        if shape(r) in done:
            continue
        r = dict(r)
        if (r["head_dim"], r["batch"], r["context"]) == (64, 8, 32768):
            r.update(run="h200-run7 (ADA) + h200-run6 (baselines)", ada_us_run6_row_tables=r["ada_us"], **tail,
                     ada_options={}, source="ADA: decode_h200_run7.log (default: no row tables at head_dim 64); "
                                            "FlashInfer/Triton/SDPA: decode_h200_run6.json (same shape, call 1)")
            r.pop("ada_tables_us", None)
            _derive(r)
        else:
            r.update(run="h200-run6", source="decode_h200_run6.json (commit e89f843: the first table launch)")
        rows.append(r)
    # run 9 (2026-12-02, third session, call 2; same kernels as run 7): the extra shapes at 8 x 32K, each with its
    # FlashInfer baselines in the same run, replace the run-6 / mixed rows; head_dim 256 is new. Its 8 x 32K 32/8/128
    # row (301.4 us vs run 7's 299.8) only confirms run 7 and is not added twice.
    r9 = json.loads((RES / "decode_h200_run9.json").read_text())["rows"]
    extra = {shape(r): r for r in r9 if (r["num_qo_heads"], r["head_dim"]) != (32, 128)}
    rows = [r for r in rows if shape(r) not in extra]
    for r in extra.values():
        r.update(run="h200-run9", source="decode_h200_run9.json (third session, call 2; kernels as in run 7)")
        if r["head_dim"] == 256:
            r["note"] = ("eager timing: at head_dim 256 the merge runs the PyTorch reference on CUDA (the Triton merge's "
                         "[256, 256] rotation needs 256 KB of shared memory), which does not capture in a CUDA graph")
        rows.append(r)
    # run 14 (2026-12-02, fourth session, call 4): head_dim 256 at 8 x 32K with the new default there (kernel "auto" =
    # the tensor-core kernel from TC_MIN_HEAD_DIM, no row tables; the value rotation before the Triton merge), in a
    # CUDA graph, FlashInfer in the same run; it replaces run 9's eager row-wise one. The row-wise kernel on the same
    # shape: decode_h200_run12_tc.json (ada_us, with the tc kernel as ada_us_compare) and decode_h200_run13.log.
    r14 = json.loads((RES / "decode_h200_run14_d256.json").read_text())["rows"]
    new = {shape(r): r for r in r14}
    rows = [r for r in rows if shape(r) not in new]
    for r in new.values():
        r.update(run="h200-run14", source="decode_h200_run14_d256.json (fourth session, call 4: tc kernel by default "
                                          "at head_dim 256, pre-rotation merge, CUDA graph)")
        rows.append(r)
    key = lambda r: (r["num_qo_heads"] != 32 or r["head_dim"] != 128, r["batch"], r["context"])  # noqa: E731
    rows.sort(key=key)                                       # the 32/8/128 grid first (README lookup), then extras
    res = dict(device="NVIDIA H200", copy_gb_s=rows[0]["copy_gb_s"], torch="2.11.0+cu130", triton="3.6.0",
               tuned={"best": {}}, rows=rows, encode=[],
               not_measured=[],
               note="Rows from four H200 calls of 2026-12-02 (runs 6, 7, 9 and 14; each row names its run and source; "
                    "see benchmarks/kernels/assemble_decode.py) with the row-wise ADA kernel at its defaults (head_dim "
                    "256: the tensor-core kernel, its default there since run 14) (block 64, "
                    "1 warp, float16 tables, 8 programs/SM, per-row level-1 tables from head_dim 128) and the blocked "
                    "merge (64 slots per step); FlashInfer 0.7.2.post1 JIT-built on the device. ada_us_compare: the "
                    "same shape with other kernel_options in the same run; ada_tables_us / ada_kernel_us / "
                    "ada_merge_*_us: the table launch, the coded kernel and the merge timed alone (batch <= 8).")
    (RES / "decode.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, RES / "decode.md")
    print(f"{len(rows)} rows -> {RES / 'decode.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
