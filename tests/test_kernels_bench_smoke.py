# SPDX-License-Identifier: Apache-2.0
"""``benchmarks/kernels/bench_decode.py --smoke`` and ``bench_extend.py --smoke`` run on the CPU under the Triton
interpreter (CI)."""
from __future__ import annotations

import json

import pytest
import torch

from sphkv_kernels.testing import use_interpreter_if_no_cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is the CPU/interpreter path")
def test_bench_decode_smoke(tmp_path):
    from benchmarks.kernels import bench_decode

    with use_interpreter_if_no_cuda():
        assert bench_decode.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "decode_smoke.json").read_text())
    assert res["max_abs_diff"] < 2e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is the CPU/interpreter path")
def test_bench_extend_smoke(tmp_path):
    """Both extend routes (rows: a decode row per new token; tiles: a key tile per block of new tokens) at a tiny
    shape vs the pure-PyTorch extend reference, as ``bench_extend.py --smoke``."""
    from benchmarks.kernels import bench_extend

    with use_interpreter_if_no_cuda():
        assert bench_extend.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "extend_smoke.json").read_text())
    assert res["rows_max_abs_diff"] < 2e-3 and res["tiles_max_abs_diff"] < 2e-3
