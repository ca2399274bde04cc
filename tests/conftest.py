# SPDX-License-Identifier: Apache-2.0
import os
import glob

# Without a GPU, Triton kernels run under the CPU interpreter. The switch is read when Triton is
# first imported (triton.language's own helpers are decorated then), so it is set here, before any
# test module imports torch, transformers or sglang. Server subprocesses drop it again.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The served SmolLM2-135M-Instruct folder (``$SPHKV_MODEL``, else prepared once under ``.cache/models``)."""
    path = Path(os.environ.get("SPHKV_MODEL", ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"))
    if not (path / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "sphkv_hf.prepare_model"], check=True, cwd=ROOT)
    return path
