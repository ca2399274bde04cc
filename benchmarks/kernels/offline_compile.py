# SPDX-License-Identifier: Apache-2.0
"""Compile the merge, the row-wise coded decode kernel and the row-table kernel for sm_90 on a machine without a GPU (no device time): catches Triton front-end errors
the CPU interpreter does not (e.g. a loop-carried variable changing shape) and prints registers / stack (spills) /
shared memory per constexpr set from the cubin (``cuobjdump -res-usage`` of Triton's bundled CUDA tools).

    python benchmarks/kernels/offline_compile.py            # merge: GQA 4/8, head_dim 64/128/256, several slots per step
    python benchmarks/kernels/offline_compile.py --rowwise  # row-wise decode (per-item / per-row tables) + row tables
    python benchmarks/kernels/offline_compile.py --extend   # tensor-core coded + dense kernels, decode/extend blocks

The local Triton may differ from the device's (3.8 here, 3.6 on the lent H200): treat the counts as indicative.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sphkv_kernels._decode_kernels import _merge_kernel  # noqa: E402

SIG = {"po_ptr": "*fp32", "pl_ptr": "*fp32", "slot_ptr": "*i32", "rot_ptr": "*fp32", "out_ptr": "*bf16",
       "stride_ob": "i32", "stride_oh": "i32", "lse_ptr": "*fp32", "num_kv_heads": "i32"}
CASES = [(4, 128, 3, 16), (4, 128, 1, 64), (8, 128, 1, 32), (3, 64, 3, 8), (1, 64, 2, 4), (4, 256, 1, 32)]


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _compile(fn, sig: dict, const: dict, num_warps: int, label: str) -> None:
    try:
        k = triton.compile(ASTSource(fn, dict(sig, **{c: "constexpr" for c in const}), const),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    except Exception as exc:  # noqa: BLE001 - report every case
        print(f"{label}: FAILED {type(exc).__name__}: {str(exc)[-600:]}", flush=True)
        return
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    res = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    sass = k.asm.get("sass") or ""
    usage = " ".join(x.strip() for x in res.splitlines() if "REG" in x)
    print(f"{label}: smem {k.metadata.shared} B; {usage}", flush=True)


def rowwise() -> None:
    """The row-wise decode kernel (sphkv-4, d = 128, GQA 4, page 64) with per-item and per-row tables, and the
    row-table kernel at head_dim 64/128/256."""
    from sphkv import SphKVConfig
    from sphkv_kernels._coded_rowwise_kernels import _coded_decode_rowwise_kernel, _row_tables_kernel
    from sphkv_kernels.layout import CodedLayout

    ptr = {"q_ptr": "*fp32", "kc_ptr": "*u8", "kr_ptr": "*fp16", "km_ptr": "*bf16", "vc_ptr": "*u8",
           "vs_ptr": "*fp16", "vz_ptr": "*fp16", "lut_ptr": "*fp32", "lutn_ptr": "*fp16", "tab_ptr": "*fp32",
           "work_ptr": "*i32", "page_ids_ptr": "*i32", "page_lens_ptr": "*i32", "po_ptr": "*fp32",
           "pl_ptr": "*fp32", "logit_ptr": "*fp32", "stride_qb": "i32", "stride_qh": "i32",
           "num_kv_heads": "i32", "qk_scale": "fp32"}
    for d in (128,) if "--tables-only" not in sys.argv else ():
        lay = CodedLayout.from_config(SphKVConfig.from_name("sphkv-4", head_dim=d, page_size=64))
        vb = lay.value_code_bytes
        for row_table in (False, True):
            const = dict(HEAD_DIM=d, GROUP=4, GP=4, G_PAD=16, PAGE_SIZE=64, BLOCK_N=64, NUM_LEVELS=lay.num_levels,
                         **lay.key_constexprs(), KW=lay.key_code_bytes // 4, VBITS=4, VE=2, VGROUP=lay.value_group,
                         VB=vb, NVG=lay.num_value_groups, HAS_MEAN=lay.has_mean, F16_DOT=True, STORE_LOGITS=False,
                         ASM_VALUES=True, PAIRED_WORDS=lay.key_code_bytes % 8 == 0, TAB16=True, LUT16=True,
                         PREFETCH=False, ROW_TABLE=row_table, PROFILE=0)
            _compile(_coded_decode_rowwise_kernel, ptr, const, 1, f"rowwise d={d} ROW_TABLE={row_table}")
    for d in (64, 128, 256):
        lay = CodedLayout.from_config(SphKVConfig.from_name("sphkv-4", head_dim=d, page_size=64))
        sig = {"q_ptr": "*bf16", "stride_qb": "i32", "stride_qh": "i32", "rt_ptr": "*fp32", "qr_ptr": "*fp32",
               "stride_rb": "i32", "stride_rh": "i32", "lut_ptr": "*fp32", "tab_ptr": "*fp32", "num_kv_heads": "i32",
               "qk_scale": "fp32"}
        const = dict(HEAD_DIM=d, GROUP=4, GP=4, LB1=lay.level_bits[0], LT1=lay.lut_offsets[0], TAB16=True,
                     IB=16)
        _compile(_row_tables_kernel, sig, const, 4, f"row tables d={d}")


def extend() -> None:
    """The tensor-core coded kernel (sphkv-4, page 64, GQA 4) as decode (``G_PAD`` 16) and with extend blocks of
    ``block_m`` 64 / 128 query rows (``EXTEND``), and the dense kernel's extend form, at head_dim 128 (and 64)."""
    from sphkv import SphKVConfig
    from sphkv_kernels._coded_tc_kernels import chunk_of, get_kernel
    from sphkv_kernels._decode_kernels import _dense_decode_kernel
    from sphkv_kernels.layout import CodedLayout

    ptr = {"q_ptr": "*fp32", "stride_qb": "i32", "stride_qh": "i32", "kc_ptr": "*u8", "kr_ptr": "*fp16",
           "km_ptr": "*bf16", "vc_ptr": "*u8", "vs_ptr": "*fp16", "vz_ptr": "*fp16", "lut_ptr": "*fp16",
           "work_ptr": "*i32", "ext_ptr": "*i32", "page_ids_ptr": "*i32", "page_lens_ptr": "*i32",
           "po_ptr": "*fp32", "pl_ptr": "*fp32", "logit_ptr": "*fp32", "num_kv_heads": "i32", "qk_scale": "fp32"}
    for d in (128, 64):
        lay = CodedLayout.from_config(SphKVConfig.from_name("sphkv-4", head_dim=d, page_size=64))
        for ext, g_pad, warps in ((False, 16, 2), (True, 64, 4), (True, 64, 8), (True, 128, 8)):
            const = dict(HEAD_DIM=d, GROUP=4, G_PAD=g_pad, PAGE_SIZE=64, BLOCK_N=64, CH=chunk_of(d), EXTEND=ext,
                         KW=lay.key_code_bytes // 4, VBITS=4, VE=2, VGROUP=lay.value_group, VB=lay.value_code_bytes,
                         NVG=lay.num_value_groups, HAS_MEAN=lay.has_mean, F16_DOT=True, STORE_LOGITS=False,
                         ASM_VALUES=True, PAIRED_WORDS=lay.key_code_bytes % 8 == 0, PROFILE=0)
            _compile(get_kernel(lay), ptr, const, warps, f"tc d={d} EXTEND={ext} rows={g_pad} warps={warps}")
    sig = {"q_ptr": "*bf16", "stride_qb": "i32", "stride_qh": "i32", "k_ptr": "*bf16", "v_ptr": "*bf16",
           "work_ptr": "*i32", "ext_ptr": "*i32", "page_ids_ptr": "*i32", "page_lens_ptr": "*i32", "po_ptr": "*fp32",
           "pl_ptr": "*fp32", "logit_ptr": "*fp32", "num_kv_heads": "i32", "qk_scale": "fp32"}
    for ext, g_pad in ((False, 16), (True, 64)):
        const = dict(HEAD_DIM=128, GROUP=4, G_PAD=g_pad, PAGE_SIZE=64, BLOCK_N=64, F32_DOT=False, STORE_LOGITS=False,
                     EXTEND=ext)
        _compile(_dense_decode_kernel, sig, const, 4, f"dense d=128 EXTEND={ext} rows={g_pad}")


def main() -> int:
    if "--rowwise" in sys.argv:
        rowwise()
        return 0
    if "--extend" in sys.argv:
        extend()
        return 0
    cuobjdump = CUOBJDUMP
    for group, d, tiers, sb in CASES:
        gp = max(2, 1 << (group - 1).bit_length())
        const = dict(HEAD_DIM=d, GROUP=group, GP=gp, G_PAD=16, NUM_TIERS=tiers, ROT_MASK=(1 << tiers) - 2 or 1,
                     WRITE_LSE=True, DOT_PREC="tf32x3", SB=sb)
        try:
            k = triton.compile(ASTSource(_merge_kernel, dict(SIG, **{c: "constexpr" for c in const}), const),
                               target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        except Exception as exc:  # noqa: BLE001 - report every case
            print(f"G={group} d={d} tiers={tiers} SB={sb}: FAILED {type(exc).__name__}: {str(exc)[-300:]}")
            continue
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        usage = " ".join(x.strip() for x in res.splitlines() if "REG" in x)
        print(f"G={group} d={d} tiers={tiers} SB={sb}: smem {k.metadata.shared} B; {usage}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
