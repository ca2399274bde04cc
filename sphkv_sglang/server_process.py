# SPDX-License-Identifier: Apache-2.0
"""Start and stop a real SGLang server process on 127.0.0.1 (tests and benchmarks).

The server runs in its own process group (``start_new_session``), so :meth:`ServerProcess.stop`
ends it and every child SGLang spawned (tokenizer, scheduler, detokenizer) — and only those.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["ServerProcess", "free_port"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m sphkv_sglang.launch_server`` (``sphkv=False`` adds ``--no-sphkv``) as a context manager.

    Examples
    --------
    >>> with ServerProcess(model, args=["--sphkv-budget", "256MiB"]) as srv:   # doctest: +SKIP
    ...     requests.post(srv.url + "/generate", json={"text": "Hi"})
    """

    def __init__(self, model_path: str | Path, *, sphkv: bool = True, args: list[str] | None = None,
                 port: int | None = None, log_path: str | Path | None = None, env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "sphkv_sglang.launch_server", "--model-path", str(model_path),
                    "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16"]
        self.cmd += ([] if sphkv else ["--no-sphkv"]) + list(args or [])
        self.log_path = Path(log_path) if log_path else None
        self.env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},   # a test's interpreter switch
                    "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._ready = False
        self._t0 = 0.0

    def start(self, timeout: float = 900.0) -> "ServerProcess":
        """Launch the server and wait until ``/health`` answers 200 (:meth:`launch` + :meth:`wait_ready`)."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> "ServerProcess":
        """Start the server process and return at once (a test session starts its servers early, in the
        background, while other tests run; :meth:`wait_ready` blocks until it serves)."""
        if self.proc is not None:
            return self
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=REPO_ROOT, start_new_session=True)
        if out is not subprocess.DEVNULL:
            out.close()                                  # the child holds its own descriptor
        return self

    def wait_ready(self, timeout: float = 900.0) -> "ServerProcess":
        """Block until ``/health`` answers 200; ``start_seconds`` = seconds from :meth:`launch` to then.
        Raises ``RuntimeError`` (with the log path) if the server exits, ``TimeoutError`` after
        ``timeout`` seconds from now (the server is then stopped)."""
        if self.proc is None:
            raise RuntimeError("wait_ready() before launch()")
        if self._ready:
            return self
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode} during start-up; "
                                   f"log: {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.start_seconds = time.monotonic() - self._t0
                        self._ready = True
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout:.0f} s; log: {self.log_path}")

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        # children that outlived the leader are still in its process group
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None
        self._ready = False

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the server and all its child processes."""
        import psutil

        root = psutil.Process(self.proc.pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
