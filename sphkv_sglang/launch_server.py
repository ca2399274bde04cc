# SPDX-License-Identifier: Apache-2.0
"""``python -m sphkv_sglang.launch_server [SGLang flags] [--sphkv-* flags]`` (console script ``sphkv-serve``).

SGLang's own launcher with three differences: ``--sphkv`` is on unless ``--no-sphkv`` is given; the
plugin is registered even when the package's entry point is not installed; on a GPU-less machine
the CPU engine is set up (:func:`sphkv_sglang.cpu.prepare`). Everything else — flags, HTTP API,
``/generate``, ``/v1/chat/completions`` — is SGLang's.
"""
from __future__ import annotations

import os
import sys

from . import cpu

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--no-sphkv" in argv:
        argv = [a for a in argv if a != "--no-sphkv"]
    elif "--sphkv" not in argv:
        argv.insert(0, "--sphkv")
    argv = cpu.prepare(argv)

    from sglang.srt.plugins import load_plugins

    from .plugin import register

    register()
    load_plugins()

    from sglang.launch_server import run_server
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    server_args = prepare_server_args(argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
