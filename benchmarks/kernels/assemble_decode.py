# SPDX-License-Identifier: Apache-2.0
"""Assemble ``benchmarks/results/decode.json`` / ``decode.md`` from the committed raw results of the H200 calls.

Session of 2026-12-02, two device calls (issue 10): call 1 wrote its rows as JSON (``decode_h200_run4.json``);
call 2's sweep was killed by its own timeout while FlashInfer JIT-built its head_dim-256 module, so its JSON was
never written and its rows are parsed from the printed table and breakdown lines of ``decode_h200_run5.log``.
Derived fields (bytes moved, GB/s, speedups) are recomputed with the formulas of ``bench_decode.py``; the
recomputed % of copy bandwidth is checked against the printed one. CPU only::

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


def main() -> int:
    run4 = json.loads((RES / "decode_h200_run4.json").read_text())
    for r in run4["rows"]:
        r["run"], r["source"] = "h200-run4", "decode_h200_run4.json"
    copy5, rows5 = parse_log(RES / "decode_h200_run5.log", "h200-run5")
    _, b1 = parse_log(RES / "decode_h200_run5_b1.log", "h200-run5")
    rows = run4["rows"] + rows5
    key = lambda r: (r["num_qo_heads"] != 32 or r["head_dim"] != 128, r["batch"], r["context"])  # noqa: E731
    rows.sort(key=key)                                       # the 32/8/128 grid first (README lookup), then extras
    res = dict(device=run4["device"], copy_gb_s=run4["copy_gb_s"], torch=run4["torch"], triton=run4["triton"],
               tuned={"best": {}}, rows=rows, encode=[],
               batch1_splits=[dict(programs_per_sm=pps, **{k: v for k, v in r.items() if k.startswith("ada_")})
                              for pps, r in zip((4, 16), b1)],
               not_measured=["8 x 32K 32/8/256: call 2's sweep timed out while FlashInfer JIT-built its head_dim-256 "
                             "decode module (and ADA's merge at d = 256 runs the PyTorch reference on CUDA); "
                             "device budget spent"],
               note="Rows from two H200 calls of 2026-12-02 (run4: JSON; run5: parsed from the printed log, see "
                    "benchmarks/kernels/assemble_decode.py) with the row-wise ADA kernel at its defaults (block 64, "
                    "1 warp, float16 tables, 8 programs/SM) and the blocked merge; FlashInfer 0.7.2.post1 JIT-built "
                    "on the device. ada_kernel_us / ada_merge_*_us: the coded kernel and the merge timed alone "
                    "(batch <= 8). batch1_splits: 1 x 32K at 4 and 16 programs per SM (FlashInfer not timed). "
                    "Device-to-device copy per run: run4 %.0f GB/s, run5 %.0f GB/s." % (run4["copy_gb_s"], copy5))
    (RES / "decode.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, RES / "decode.md")
    print(f"{len(rows)} rows -> {RES / 'decode.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
