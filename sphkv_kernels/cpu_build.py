# SPDX-License-Identifier: Apache-2.0
"""Build-once loading of the C++ CPU kernels (``torch.utils.cpp_extension.load_inline``).

Each CPU kernel module keeps one :class:`InlineExtension`; its :meth:`~InlineExtension.load` compiles the source
on first use (cached by torch under ``~/.cache/torch_extensions``, keyed by a hash of the source), returns the
module, or ``None`` — logged once — when no compiler is available, the build fails or ``SPHKV_CPU_KERNEL=0``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field

__all__ = ["InlineExtension"]

logger = logging.getLogger(__name__)


@dataclass
class InlineExtension:
    """One C++ source compiled on first :meth:`load`.

    name : module name prefix (the source hash is appended); source : the C++ text; functions : the names bound to
    Python; cflags : compiler flags; what : the words logs use for it.
    """

    name: str
    source: str
    functions: tuple[str, ...]
    cflags: tuple[str, ...]
    what: str
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _module: object = field(default=None, init=False, repr=False)
    _tried: bool = field(default=False, init=False, repr=False)

    def load(self):
        """The compiled module, or ``None`` when unavailable (no compiler, build error, ``SPHKV_CPU_KERNEL=0``)."""
        with self._lock:
            if self._tried:
                return self._module
            self._tried = True
            if os.environ.get("SPHKV_CPU_KERNEL", "1") == "0":
                logger.info("sphkv: %s disabled (SPHKV_CPU_KERNEL=0)", self.what)
                return None
            try:
                from torch.utils.cpp_extension import load_inline

                tag = hashlib.sha256(self.source.encode()).hexdigest()[:10]
                self._module = load_inline(name=f"{self.name}_{tag}", cpp_sources=self.source,
                                           functions=list(self.functions), extra_cflags=list(self.cflags),
                                           verbose=False)
                logger.info("sphkv: %s loaded (%s)", self.what, tag)
            except Exception as e:                               # no compiler, no headers, build error
                logger.warning("sphkv: %s unavailable (%s)", self.what, e)
                self._module = None
            return self._module
