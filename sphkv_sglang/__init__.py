# SPDX-License-Identifier: Apache-2.0
"""Spherical KV inside SGLang 0.5.23: plugin, tiered angle-coded KV pool, ``sphkv`` attention
backend, radix-node retention and a launcher.

Importing this package patches nothing. SGLang activates it through the ``sglang.srt.plugins``
entry point (:func:`sphkv_sglang.plugin.register`) in every process it starts; a server uses it
only when launched with ``--sphkv`` (``python -m sglang.launch_server ... --sphkv`` or
``python -m sphkv_sglang.launch_server ...``).
"""
from .config import SphKVServeConfig as SphKVServeConfig

__all__ = ["SphKVServeConfig"]
