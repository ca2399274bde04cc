# SPDX-License-Identifier: Apache-2.0
"""Triton kernels for the Spherical KV hot loop, with pure-PyTorch references of identical signature.

* :mod:`~sphkv_kernels.encode` — pages of keys/values → angle codes + radius + page mean, packed values;
* :mod:`~sphkv_kernels.decode` — paged split-K decode per tier (coded and dense) and the exact merge;
* :mod:`~sphkv_kernels.schedule` — the split-K work schedule built once per batch;
* :mod:`~sphkv_kernels.extend` — the pure-PyTorch extend reference (prefill over a coded prefix);
* :mod:`~sphkv_kernels.extend_tiles` — the extend schedule of the tensor-core kernel's block-of-new-tokens form;
* :mod:`~sphkv_kernels.cpu_decode` — the CPU kernels (C++, compiled on first use): paged attention over
  coded and dense tier pages in page-sized tiles, decode-partial and many-queries-per-row forms (extend:
  8-page tiles through ATen's CPU flash kernel);
* :mod:`~sphkv_kernels.cpu_encode` — the CPU page encoder (C++), the CPU form of ``encode_pages``;
* :mod:`~sphkv_kernels.layout` — the compile-time description of a coded tier.

Importing this package neither imports Triton eagerly nor patches anything. Kernels run on CUDA, or
on CPU tensors when ``TRITON_INTERPRET=1`` is set before Triton is first imported.
"""
from .decode import (coded_decode_partial as coded_decode_partial,
                     coded_decode_partial_reference as coded_decode_partial_reference,
                     coded_row_tables as coded_row_tables, coded_row_tables_reference as coded_row_tables_reference,
                     dense_decode_partial as dense_decode_partial,
                     dense_decode_partial_reference as dense_decode_partial_reference,
                     interpreting as interpreting, merge_partials as merge_partials,
                     merge_partials_reference as merge_partials_reference)
from .encode import encode_pages as encode_pages, encode_pages_reference as encode_pages_reference
from .layout import CodedLayout as CodedLayout
from .schedule import (DecodeSchedule as DecodeSchedule, TierWork as TierWork,
                       entry_page_lens as entry_page_lens, schedule_decode as schedule_decode)

__all__ = ["CodedLayout", "DecodeSchedule", "TierWork", "schedule_decode", "entry_page_lens",
           "coded_decode_partial", "coded_decode_partial_reference", "coded_row_tables",
           "coded_row_tables_reference", "dense_decode_partial",
           "dense_decode_partial_reference", "merge_partials", "merge_partials_reference",
           "encode_pages", "encode_pages_reference", "interpreting"]
