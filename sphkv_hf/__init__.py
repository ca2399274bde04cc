# SPDX-License-Identifier: Apache-2.0
"""Hugging Face transformers integration: an ADA-coded ``Cache`` and the ``"sphkv"`` attention function.

Importing this package patches nothing; :func:`install` registers the attention function.
Model preparation (:mod:`sphkv_hf.prepare_model`) and the essays (:mod:`sphkv_hf.data`) live here too.
"""
from .attention import install as install, segment_attention as segment_attention
from .attention import sphkv_attention_forward as sphkv_attention_forward
from .cache import CachePolicy as CachePolicy, SphKVCache as SphKVCache, SphKVLayer as SphKVLayer
from .data import load_essays as load_essays
from .prepare_model import ensure_model as ensure_model
from .segments import CodedSegment as CodedSegment, DenseSegment as DenseSegment, Segment as Segment

__all__ = ["install", "segment_attention", "sphkv_attention_forward", "CachePolicy", "SphKVCache", "SphKVLayer",
           "load_essays", "ensure_model", "Segment", "DenseSegment", "CodedSegment"]
