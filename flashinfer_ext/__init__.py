# SPDX-License-Identifier: Apache-2.0
"""FlashInfer-style wrappers over the Spherical KV kernels: ``plan()`` once per batch, ``run()`` per layer.

Importing this package registers custom ops in its own ``torch.library`` namespace
(``sphkv_kernels::*``, see :mod:`flashinfer_ext.ops`) and patches nothing else.
"""
from . import ops as ops
from .decode import BatchDecodeWithSphKVPagedKVCacheWrapper as BatchDecodeWithSphKVPagedKVCacheWrapper
from .decode import resolve_backend as resolve_backend
from .encode import SphKVPageEncoder as SphKVPageEncoder
from .prefill import BatchPrefillWithSphKVPagedKVCacheWrapper as BatchPrefillWithSphKVPagedKVCacheWrapper

__all__ = ["BatchDecodeWithSphKVPagedKVCacheWrapper", "BatchPrefillWithSphKVPagedKVCacheWrapper", "SphKVPageEncoder",
           "resolve_backend", "ops"]
