# SPDX-License-Identifier: Apache-2.0
"""``python -m sphkv_sglang.launch_server [SGLang flags] [--sphkv-* flags]`` (console script ``sphkv-serve``).

SGLang's own launcher with four differences: ``--sphkv`` is on unless ``--no-sphkv`` is given;
``--enable-cache-report`` is on unless ``--no-cache-report`` is given (OpenAI clients get
``usage.prompt_tokens_details.cached_tokens`` instead of ``null``); the plugin is registered even when
the package's entry point is not installed; on a GPU-less machine the CPU engine is set up
(:func:`sphkv_sglang.cpu.prepare`), and with ``--dp-size``/``--tp-size`` > 1 there each rank gets its
own share of the cores (:func:`bind_cpu_ranks`). Everything else — flags, HTTP API, ``/generate``,
``/v1/chat/completions`` — is SGLang's.
"""
from __future__ import annotations

import os
import sys

from . import cpu

__all__ = ["main", "default_args", "cpu_bind_groups", "bind_cpu_ranks"]


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


def cpu_bind_groups(ranks: int, cpus: list[int]) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` value giving each of ``ranks`` ranks its own contiguous share of
    ``cpus`` (``"0|1"`` for two ranks on two cores); with fewer cores than ranks, ranks share cores
    round-robin. Raises ``ValueError`` for ``ranks < 1`` or no cpus."""
    if ranks < 1 or not cpus:
        raise ValueError(f"cpu_bind_groups needs ranks >= 1 and at least one cpu, got ranks={ranks}, cpus={cpus}")
    cpus = sorted(cpus)
    if len(cpus) < ranks:
        return "|".join(str(cpus[r % len(cpus)]) for r in range(ranks))
    per, extra = divmod(len(cpus), ranks)
    groups, start = [], 0
    for r in range(ranks):
        n = per + (r < extra)
        ids = cpus[start:start + n]
        start += n
        contiguous = ids[-1] - ids[0] == len(ids) - 1
        groups.append((f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0])) if contiguous else ",".join(map(str, ids)))
    return "|".join(groups)


def bind_cpu_ranks(ranks: int) -> None:
    """SGLang's CPU engine binds one rank per NUMA node and refuses more ranks than nodes unless
    ``SGLANG_CPU_OMP_THREADS_BIND`` is set: for ``--dp-size``/``--tp-size`` > 1 on a one-node machine,
    split this process's cores among the ranks (an explicit setting is kept)."""
    if ranks <= 1 or os.environ.get("SGLANG_CPU_OMP_THREADS_BIND"):
        return
    os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_bind_groups(ranks, sorted(os.sched_getaffinity(0)))


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
    if not cpu.has_gpu():
        bind_cpu_ranks(server_args.dp_size * server_args.tp_size * server_args.pp_size)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
