# SPDX-License-Identifier: Apache-2.0
import os
import glob

# Without a GPU, Triton kernels run under the CPU interpreter. The switch is read when Triton is
# first imported (triton.language's own helpers are decorated then), so it is set here, before any
# test module imports torch, transformers or sglang. Server subprocesses drop it again.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import atexit  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# Modules measured slowest first (stop-16 CI, seconds): with `make test`'s xdist workers (`--dist loadfile`)
# a module runs on one worker, in collection order, so the long server modules start at once on both cores
# and the short CPU modules fill in behind them instead of leaving one core idle at the end.
_SLOW_MODULES_FIRST = ("test_sglang_server", "test_reliability_server", "test_scaleout",
                       "test_retention_server", "test_hf_harness", "test_kernels_decode", "test_hf_model")


def _module_rank(item) -> int:
    name = item.path.stem
    return _SLOW_MODULES_FIRST.index(name) if name in _SLOW_MODULES_FIRST else len(_SLOW_MODULES_FIRST)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    items.sort(key=_module_rank)                          # stable: the order inside a module is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The served SmolLM2-135M-Instruct folder (``$SPHKV_MODEL``, else prepared once under ``.cache/models``)."""
    import fcntl

    path = _model_dir()
    if not (path / "config.json").is_file():
        lock = ROOT / ".cache" / "prepare-model.lock"          # xdist workers convert it once, not twice
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            if not (path / "config.json").is_file():
                subprocess.run([sys.executable, "-m", "sphkv_hf.prepare_model"], check=True, cwd=ROOT)
    return path


# -- real SGLang servers shared by the whole session ------------------------------------------------------
# Each server a collected test asks for (by fixture name) is launched in the background as soon as
# collection ends, so its 1-2 min start-up overlaps the CPU-only tests that run first (pytest uses one
# core); the fixture waits for /health when the first test needs it. One server per configuration for
# the whole session, shared by every module that asks for it; each is stopped after the last test that
# uses it (a full server holds ~2.8 GB), and any left at the end of the session.
def _server_specs() -> dict:
    from benchmarks.serving.load import SHORT, server_args

    return {
        # sphkv-8, 256 MiB: tests/test_sglang_server.py (generate/chat, multi-turn, fork, flush, parity)
        "sphkv_server": dict(args=["--sphkv-preset", "sphkv-8", "--sphkv-budget", "256MiB"]),
        # the dense bf16 reference of the greedy parity test
        "dense_server": dict(sphkv=False, args=["--max-total-tokens", "16384"]),
        # the sphkv-8 server's configuration on two data-parallel ranks: tests/test_scaleout.py
        "dp2_server": dict(args=["--sphkv-preset", "sphkv-8", "--sphkv-budget", "256MiB", "--dp-size", "2"]),
        # a 512-token pool with freed-page poisoning: tests/test_reliability_server.py
        "reliability_server": dict(args=server_args(SHORT), env={"SPHKV_DEBUG_POISON": "1"}),
    }


_SERVERS: dict = {}


def _model_dir() -> Path:
    return Path(os.environ.get("SPHKV_MODEL", ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"))


def _can_launch() -> bool:
    """A server can start now: the model is converted and SGLang imports (else the fixtures skip/prepare)."""
    if not (_model_dir() / "config.json").is_file():
        return False
    try:
        import sglang  # noqa: F401
    except ImportError:
        return False
    return True


def _launch(name: str):
    from sphkv_sglang.server_process import ServerProcess

    if name not in _SERVERS:
        logs = Path(tempfile.mkdtemp(prefix="sphkv-test-servers-"))
        spec = _server_specs()[name]
        _SERVERS[name] = ServerProcess(_model_dir(), log_path=logs / f"{name}.log", **spec).launch()
    return _SERVERS[name]


def _stop_servers() -> None:
    while _SERVERS:
        _SERVERS.popitem()[1].stop()


atexit.register(_stop_servers)


_LAST_USER: dict = {}     # server name -> nodeid of the last collected test that uses it


_XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
_MODULE_SERVERS: dict = {}  # module path -> server names its tests ask for (xdist workers)


def _servers_of(item) -> set:
    return set(getattr(item, "fixturenames", ())) & set(_SERVER_NAMES)


def pytest_collection_finish(session):
    if _XDIST:
        # A worker does not know which modules it will be sent: it launches a module's servers when the
        # module's first test starts (all of them at once, so they start side by side) and stops them after
        # the module's last test that uses each one. A server shared by modules on two workers runs twice.
        for item in session.items:
            names = _servers_of(item)
            _MODULE_SERVERS.setdefault(item.path, set()).update(names)
            for name in names:
                _LAST_USER[(item.path, name)] = item.nodeid
        return
    for item in session.items:
        for name in _servers_of(item):
            _LAST_USER[name] = item.nodeid
    wanted = set(_LAST_USER)
    if not wanted or session.config.option.collectonly or not _can_launch():
        return                                            # the fixtures prepare the model, then launch
    for name in _SERVER_NAMES:                            # launched in this order
        if name in wanted:
            _launch(name)


_STARTED_MODULES: set = set()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if not _XDIST or item.path in _STARTED_MODULES or not _can_launch():
        return
    _STARTED_MODULES.add(item.path)
    for name in _SERVER_NAMES:
        if name in _MODULE_SERVERS.get(item.path, ()):
            _launch(name)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop a server once the last test that uses it is done (frees its memory for the rest of the run)."""
    for key, last in _LAST_USER.items():
        name = key[1] if _XDIST else key
        if last == item.nodeid and name in _SERVERS:
            _SERVERS.pop(name).stop()


def pytest_sessionfinish(session, exitstatus):
    _stop_servers()


_SERVER_NAMES = ("reliability_server", "sphkv_server", "dp2_server", "dense_server")   # launch order: first needed first


def _server_scope(fixture_name, config) -> str:
    # Under xdist a worker stops a module's servers when the module ends (see pytest_collection_finish),
    # so a later module on the same worker must get a fresh one, not a cached handle to a stopped server.
    return "module" if _XDIST else "session"


def _server_fixture(name: str):
    @pytest.fixture(scope=_server_scope, name=name)
    def fixture(model_path):
        pytest.importorskip("sglang")
        srv = _launch(name)
        yield srv.wait_ready()
        srv.stop()
        _SERVERS.pop(name, None)
    return fixture


sphkv_server = _server_fixture("sphkv_server")
dense_server = _server_fixture("dense_server")
reliability_server = _server_fixture("reliability_server")
dp2_server = _server_fixture("dp2_server")
