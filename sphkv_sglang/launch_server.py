# SPDX-License-Identifier: Apache-2.0
"""``python -m sphkv_sglang.launch_server [SGLang flags] [--sphkv-* flags]`` (console script ``sphkv-serve``).

SGLang's own launcher with four differences: ``--sphkv`` is on unless ``--no-sphkv`` is given;
``--enable-cache-report`` is on unless ``--no-cache-report`` is given (OpenAI clients get
``usage.prompt_tokens_details.cached_tokens`` instead of ``null``); the plugin is registered even when
the package's entry point is not installed; on a GPU-less machine the CPU engine is set up
(:func:`sphkv_sglang.cpu.prepare`). Everything else — flags, HTTP API, ``/generate``,
``/v1/chat/completions`` — is SGLang's.
"""
from __future__ import annotations

import os
import sys

from . import cpu

__all__ = ["main", "default_args"]


def default_args(argv: list[str]) -> list[str]:
    """The launcher's defaults on top of ``argv``: ``--sphkv`` (unless ``--no-sphkv``) and
    ``--enable-cache-report`` (unless ``--no-cache-report``)."""
    argv = list(argv)
    if "--no-sphkv" in argv:
        argv = [a for a in argv if a != "--no-sphkv"]
    elif "--sphkv" not in argv:
        argv.insert(0, "--sphkv")
    if "--no-cache-report" in argv:
        argv = [a for a in argv if a != "--no-cache-report"]
    elif "--enable-cache-report" not in argv:
        argv.append("--enable-cache-report")
    return argv


def main(argv: list[str] | None = None) -> None:
    argv = default_args(sys.argv[1:] if argv is None else argv)
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
