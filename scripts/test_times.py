# SPDX-License-Identifier: Apache-2.0
"""Where ``make test``'s time goes: per-module seconds from pytest JUnit XML files.

    python -m pytest -q tests --junitxml=/tmp/run.xml        # (make test with PYTEST_ADDOPTS=--junitxml=...)
    python scripts/test_times.py /tmp/run.xml [--before /tmp/old.xml] [--json out.json] [--top 20]

Prints a table (module, tests, seconds, and with ``--before`` the earlier seconds and the change),
slowest module first, then the slowest single tests. A test's time is setup + call + teardown as
pytest reports it (``junit_duration_report = total``), so a session-scoped server's start-up is
counted in the first test that waits for it. ``--json`` writes the same numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def read_junit(path: Path) -> dict:
    """``{"wall_s": float, "modules": {module: {"tests": n, "seconds": s}}, "tests": {nodeid: s}}``."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    modules: dict = defaultdict(lambda: {"tests": 0, "seconds": 0.0})
    tests = {}
    wall = 0.0
    for suite in suites:
        wall += float(suite.get("time", 0.0))
        for case in suite.iter("testcase"):
            classname = case.get("classname", "")
            module = classname.split(".")[-1] if classname.startswith("tests.") else classname.split(".")[0]
            if not module.startswith("test_"):
                module = next((part for part in classname.split(".") if part.startswith("test_")), classname)
            seconds = float(case.get("time", 0.0))
            modules[module]["tests"] += 1
            modules[module]["seconds"] += seconds
            tests[f"{module}::{case.get('name')}"] = seconds
    if not tests:
        raise ValueError(f"{path}: no <testcase> elements (not a pytest JUnit XML file?)")
    return {"wall_s": wall, "modules": dict(modules), "tests": tests}


def table(now: dict, before: dict | None, top: int) -> str:
    names = sorted(now["modules"], key=lambda m: -now["modules"][m]["seconds"])
    if before:
        names += sorted(set(before["modules"]) - set(names))
    head = "| module | tests | seconds |" + (" before | change |" if before else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in names:
        cur = now["modules"].get(m, {"tests": 0, "seconds": 0.0})
        row = f"| {m} | {cur['tests']} | {cur['seconds']:.1f} |"
        if before:
            old = before["modules"].get(m, {"seconds": 0.0})["seconds"]
            row += f" {old:.1f} | {cur['seconds'] - old:+.1f} |"
        lines.append(row)
    total = sum(v["seconds"] for v in now["modules"].values())
    row = f"| **total (wall {now['wall_s']:.0f} s)** | {len(now['tests'])} | {total:.1f} |"
    if before:
        old = sum(v["seconds"] for v in before["modules"].values())
        row += f" {old:.1f} (wall {before['wall_s']:.0f} s) | {total - old:+.1f} |"
    lines.append(row)
    lines += ["", f"slowest {top} tests:"]
    for name, s in sorted(now["tests"].items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {s:8.1f} s  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("junit", type=Path, help="pytest --junitxml file of the run")
    ap.add_argument("--before", type=Path, default=None, help="an earlier run's JUnit XML, for comparison")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    ap.add_argument("--top", type=int, default=15, help="how many of the slowest tests to list")
    args = ap.parse_args(argv)
    for p in (args.junit, args.before):
        if p is not None and not p.is_file():
            ap.error(f"no such file: {p}")
    now = read_junit(args.junit)
    before = read_junit(args.before) if args.before else None
    print(table(now, before, args.top))
    if args.json:
        args.json.write_text(json.dumps({"now": now, "before": before}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
