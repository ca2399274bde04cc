# SPDX-License-Identifier: Apache-2.0
import os
import glob

# Without a GPU, Triton kernels run under the CPU interpreter. The switch is read when Triton is
# first imported (triton.language's own helpers are decorated then), so it is set here, before any
# test module imports torch, transformers or sglang. Server subprocesses drop it again.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
