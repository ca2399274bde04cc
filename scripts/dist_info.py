"""Write this clone's package metadata (entry points) into ``<clone>/.cache/site``.

The shared environment under ``~/.cache/sphkv`` holds only third-party packages. Each clone puts
itself first on ``PYTHONPATH`` (its source tree, then ``.cache/site`` for the metadata SGLang's
plugin loader reads through ``importlib.metadata``), so two clones side by side each import their
own code, and running ``make`` in one never changes what a server started from the other imports.

Usage: ``python scripts/dist_info.py <site-dir>``
"""
from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(site: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    for old in site.glob("*.dist-info"):
        if old != dist:
            shutil.rmtree(old)
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, entries in project.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
        lines.append("")
    (dist / "entry_points.txt").write_text("\n".join(lines))
    (dist / "top_level.txt").write_text("")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
