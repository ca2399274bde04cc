# SPDX-License-Identifier: Apache-2.0
"""Compile the merge kernel for sm_90 on a machine without a GPU (no device time): catches Triton front-end errors
the CPU interpreter does not (e.g. a loop-carried variable changing shape) and prints registers / stack (spills) /
shared memory per constexpr set from the cubin (``cuobjdump -res-usage`` of Triton's bundled CUDA tools).

    python benchmarks/kernels/offline_compile.py            # GQA 4/8, head_dim 64/128/256, several slots per step

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


def main() -> int:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
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
