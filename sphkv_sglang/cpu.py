# SPDX-License-Identifier: Apache-2.0
"""Run SGLang's CPU engine on a machine without a GPU (see reference/sglang-cpu-server.md).

SGLang's CPU engine needs ``SGLANG_USE_CPU_ENGINE=1``, and in that mode imports names from
``sgl_kernel``, whose PyPI build links against the CUDA driver library. A stand-in ``libcuda.so.1``
(``scripts/libcuda_stub.c``: every driver entry point returns CUDA_ERROR_NO_DEVICE) satisfies the
loader. :func:`prepare` sets this up for the current process and its children; it does nothing when
a GPU is present.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["has_gpu", "stub_path", "ensure_stub", "prepare"]

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
STUB_SOURCE = REPO_ROOT / "scripts" / "libcuda_stub.c"


def has_gpu() -> bool:
    """True when an NVIDIA device node is present (no CUDA initialisation, no torch import)."""
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


def stub_path() -> Path:
    """Where the stand-in library lives: ``$SPHKV_STUB_DIR`` or ``~/.cache/sphkv/stub``."""
    return Path(os.environ.get("SPHKV_STUB_DIR", Path.home() / ".cache" / "sphkv" / "stub")) / "libcuda.so.1"


def ensure_stub() -> Path:
    """Build the stand-in ``libcuda.so.1`` from ``scripts/libcuda_stub.c`` if it is missing."""
    out = stub_path()
    if out.is_file():
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None or not STUB_SOURCE.is_file():
        raise FileNotFoundError(f"{out} is missing and cannot be built (need a C compiler and {STUB_SOURCE}); "
                                "run `make stub` in a checkout of the project")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(STUB_SOURCE)], check=True)
    tmp.replace(out)
    return out


def prepare(argv: list[str]) -> list[str]:
    """On a GPU-less host: CPU engine, stand-in driver (loaded now, and on ``LD_LIBRARY_PATH`` for the
    spawned children), one OpenMP thread, ``--device cpu`` and ``--sleep-on-idle`` unless given.
    Returns the (possibly extended) argument list."""
    if has_gpu():
        return argv
    stub = ensure_stub()
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if str(stub.parent) not in paths:
        os.environ["LD_LIBRARY_PATH"] = ":".join([str(stub.parent), *paths])
    ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
    argv = list(argv)
    if "--device" not in argv and not any(a.startswith("--device=") for a in argv):
        argv += ["--device", "cpu"]
    if "--sleep-on-idle" not in argv:
        argv.append("--sleep-on-idle")
    return argv
