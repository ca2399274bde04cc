# SPDX-License-Identifier: Apache-2.0
"""Clones side by side each run their own code, and the launcher's defaults.

The shared environment under ``~/.cache/sphkv`` holds only third-party packages; each clone puts its
own tree and its ``.cache/site`` (entry-point metadata written by ``scripts/dist_info.py``) first on
``PYTHONPATH`` (the Makefile does). So SGLang's plugin loader, in any process of a server started
from this clone, imports this clone's ``sphkv_sglang`` — never another clone's.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sphkv_sglang.launch_server import default_args

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import importlib.metadata, json, sys
eps = [ep for ep in importlib.metadata.entry_points(group="sglang.srt.plugins") if ep.name == "sphkv"]
out = {"count": len(eps), "value": eps[0].value if eps else None,
       "dist": str(eps[0].dist._path) if eps else None}
from sglang.srt.plugins import load_plugins
load_plugins()                                   # SGLang's own loader, as every server process runs it
import sphkv_sglang, sphkv_sglang.plugin as plugin
out.update(module=sphkv_sglang.__file__, registered=plugin._registered)
print(json.dumps(out))
"""


def test_plugin_entry_point_resolves_to_this_clone(tmp_path):
    """From another working directory, with the environment ``make`` gives, SGLang's plugin loader
    finds exactly one ``sphkv`` entry point, its metadata is this clone's ``.cache/site``, and the
    module it registers is this clone's."""
    pytest.importorskip("sglang")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["count"] == 1, out
    assert out["value"] == "sphkv_sglang.plugin:register"
    assert Path(out["dist"]).resolve().is_relative_to(ROOT / ".cache" / "site"), out
    assert Path(out["module"]).resolve().is_relative_to(ROOT), out
    assert out["registered"] is True


def test_shared_environment_holds_no_project_install():
    """Nothing of the project in the venv's site-packages: no dist-info, no editable finder, no .pth
    pointing at a clone (``make env`` removes what older Makefiles installed)."""
    site = Path(sysconfig.get_paths()["purelib"])
    assert site.is_dir()
    names = [p.name for p in site.iterdir()]
    offenders = [n for n in names if "spherical" in n.lower() or n.startswith(("sphkv", "flashinfer_ext"))]
    for pth in site.glob("*.pth"):
        text = pth.read_text(errors="replace")
        if "/work/" in text or "sphkv" in text:
            offenders.append(f"{pth.name}: {text.strip()[:200]}")
    assert not offenders, offenders
    dists = [d.metadata["Name"] for d in importlib.metadata.distributions() if d.metadata["Name"] == "spherical-kv"]
    assert len(dists) == 1                          # only this clone's .cache/site metadata


def test_launcher_defaults_sphkv_and_cache_report():
    assert default_args([]) == ["--sphkv", "--enable-cache-report"]
    assert default_args(["--no-sphkv"]) == ["--enable-cache-report"]
    assert default_args(["--enable-cache-report", "--sphkv"]) == ["--enable-cache-report", "--sphkv"]
    assert default_args(["--no-cache-report", "--port", "1"]) == ["--sphkv", "--port", "1"]


def test_serve_script_uses_the_launcher_with_its_defaults():
    text = (ROOT / "scripts" / "serve.sh").read_text()
    assert "-m sphkv_sglang.launch_server" in text and "--no-cache-report" not in text
