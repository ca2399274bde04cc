# SPDX-License-Identifier: Apache-2.0
"""Launch the decode kernels once each at batch 8 × 32K (for ``ncu``): coded row-wise (full), coded
row-wise without the key decode (diagnostic), coded tile kernel (the previous design), dense bf16. Usage:
``ncu --clock-control none -k regex:decode --launch-skip 3 ... python3 benchmarks/kernels/profile_decode.py``;
the first 3 launches are warm-ups."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.kernels.bench_decode import D, HKV, HQ, ada_case, coded_tier, dense_case  # noqa: E402
from sphkv_kernels import coded_decode_partial  # noqa: E402
from sphkv_kernels.layout import CodedLayout  # noqa: E402


def main() -> None:
    tier = coded_tier("sphkv-4", 64)
    w, pool, _ = ada_case(8, 32768, tier, 64)
    pl = w._plan
    tw = pl["sched"].tiers[0]
    lay = CodedLayout.from_pool(pool)
    q = torch.randn(8, HQ, D, dtype=torch.bfloat16, device="cuda")
    qrot = (q.float() @ lay.on("cuda")["key_rotation_t"]).contiguous()
    args = (qrot, *pool.tensors().values(), tw.work, tw.page_ids, tw.page_lens, pl["part_o"], pl["part_lse"])
    opts = dict(layout=lay, num_kv_heads=HKV, sm_scale=D ** -0.5, kernel="rowwise")     # launcher defaults
    for _ in range(3):
        coded_decode_partial(*args, **opts)
    torch.cuda.synchronize()
    coded_decode_partial(*args, **opts)
    coded_decode_partial(*args, profile=1, **opts)
    coded_decode_partial(*args, layout=lay, num_kv_heads=HKV, sm_scale=D ** -0.5, kernel="tile", block_n=64,
                         num_warps=4, num_stages=1)
    dw, cache = dense_case(8, 32768, 64)
    dw.run(q, [cache])
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
