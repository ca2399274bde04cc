# SPDX-License-Identifier: Apache-2.0
"""``torch.library`` custom ops (namespace ``sphkv_kernels``) around the kernels, with fake impls.

Registering them touches nothing outside our own namespace; it happens once, when this module is
first imported (``flashinfer_ext`` imports it). Each op mutates its output arguments and returns
nothing, so ``torch.compile`` and CUDA-graph capture see an opaque, side-effecting call whose fake
implementation does nothing. A mutated argument is never optional: torch 2.11's in-place/view
bookkeeping (``custom_ops.adinplaceorview_impl``) fails with ``IndexError`` on a mutated ``Tensor?``
passed as ``None``, so "absent" travels as an empty tensor (:func:`absent`, ``numel() == 0``).
``backend`` is ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``),
``"cpu"`` (the C++ CPU kernels of :mod:`sphkv_kernels.cpu_decode` (decode ops) and
:mod:`sphkv_kernels.cpu_encode` (``encode_pages``)) or ``"reference"``
(pure PyTorch, any device). A coded tier's codec travels as ``config``: the JSON
of its :class:`sphkv.SphKVConfig` (see :func:`config_key`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import torch

from sphkv.config import SphKVConfig
from sphkv_kernels import cpu_decode as _cpu
from sphkv_kernels import decode as _dec
from sphkv_kernels import encode as _enc
from sphkv_kernels.layout import CodedLayout

__all__ = ["config_key", "layout_of", "NAMESPACE", "absent"]

NAMESPACE = "sphkv_kernels"


def config_key(config: SphKVConfig) -> str:
    """Deterministic string form of a config (the ``config`` argument of the coded ops)."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


@functools.lru_cache(maxsize=64)
def layout_of(key: str) -> CodedLayout:
    """Inverse of :func:`config_key`, resolved to the tier's :class:`CodedLayout` (cached)."""
    spec = json.loads(key)
    spec["level_bits"] = tuple(spec["level_bits"])
    return CodedLayout.from_config(SphKVConfig(**spec))


def absent(device) -> torch.Tensor:
    """The empty float32 tensor that stands for "no tensor" in a mutated argument of these ops."""
    return torch.empty(0, dtype=torch.float32, device=device)


def _opt(t: torch.Tensor):
    return t if t.numel() else None


def _pick(backend: str, triton_fn, reference_fn, cpu_fn=None):
    if backend == "triton":
        return triton_fn
    if backend == "reference":
        return reference_fn
    if backend == "cpu" and cpu_fn is not None:
        return cpu_fn
    raise ValueError(f"backend={backend!r}; allowed: 'triton', 'reference'" + (", 'cpu'" if cpu_fn else ""))


@torch.library.custom_op(f"{NAMESPACE}::coded_decode_partial",
                         mutates_args=("part_o", "part_lse", "logits", "scratch"))
def coded_decode_partial(q_rot: torch.Tensor, k_codes: torch.Tensor, k_radius: torch.Tensor, k_mean: torch.Tensor,
                         v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, work: torch.Tensor,
                         page_ids: torch.Tensor, page_lens: torch.Tensor, part_o: torch.Tensor,
                         part_lse: torch.Tensor, logits: torch.Tensor, config: str, num_kv_heads: int,
                         sm_scale: float, backend: str, block_n: int, num_warps: int,
                         num_stages: int, scratch: torch.Tensor, variant: str = "") -> None:
    """``variant``: JSON object of further launcher options (``kernel``, ``maxnreg``, ``tab16``, ``lut16``,
    ``asm_values``, ``prefetch``; see :func:`sphkv_kernels.decode.coded_decode_partial`), empty for the defaults.
    ``logits`` and ``scratch``: empty tensors (:func:`absent`) when not used."""
    kw = {}
    if backend == "triton":
        kw = dict(block_n=block_n or None, num_warps=num_warps or None, num_stages=num_stages or None,
                  scratch=_opt(scratch), **(json.loads(variant) if variant else {}))
    fn = _pick(backend, _dec.coded_decode_partial, _dec.coded_decode_partial_reference, _cpu.coded_decode_partial_cpu)
    fn(q_rot, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, work, page_ids, page_lens, part_o, part_lse,
       layout=layout_of(config), num_kv_heads=num_kv_heads, sm_scale=sm_scale, logits=_opt(logits), **kw)


@coded_decode_partial.register_fake
def _(q_rot, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, work, page_ids, page_lens, part_o, part_lse,
      logits, config, num_kv_heads, sm_scale, backend, block_n, num_warps, num_stages, scratch, variant=""):
    return None


@torch.library.custom_op(f"{NAMESPACE}::coded_row_tables", mutates_args=("q_rot", "tables"))
def coded_row_tables(q: torch.Tensor, q_rot: torch.Tensor, tables: torch.Tensor, config: str, num_kv_heads: int,
                     sm_scale: float, tab16: bool, backend: str) -> None:
    """Rotated queries and per-row level-1 tables of a coded tier (:func:`sphkv_kernels.decode.coded_row_tables`)."""
    fn = _pick(backend, _dec.coded_row_tables, _dec.coded_row_tables_reference)
    fn(q, q_rot, tables, layout=layout_of(config), num_kv_heads=num_kv_heads, sm_scale=sm_scale, tab16=tab16)


@coded_row_tables.register_fake
def _(q, q_rot, tables, config, num_kv_heads, sm_scale, tab16, backend):
    return None


@torch.library.custom_op(f"{NAMESPACE}::dense_decode_partial", mutates_args=("part_o", "part_lse", "logits"))
def dense_decode_partial(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, work: torch.Tensor,
                         page_ids: torch.Tensor, page_lens: torch.Tensor, part_o: torch.Tensor,
                         part_lse: torch.Tensor, logits: torch.Tensor, num_kv_heads: int,
                         sm_scale: float, backend: str, block_n: int = 0, num_warps: int = 0,
                         num_stages: int = 0) -> None:
    fn = _pick(backend, _dec.dense_decode_partial, _dec.dense_decode_partial_reference, _cpu.dense_decode_partial_cpu)
    fn(q, k_pages, v_pages, work, page_ids, page_lens, part_o, part_lse, num_kv_heads=num_kv_heads,
       sm_scale=sm_scale, logits=_opt(logits), block_n=block_n or None, num_warps=num_warps or None,
       num_stages=num_stages or None)


@dense_decode_partial.register_fake
def _(q, k_pages, v_pages, work, page_ids, page_lens, part_o, part_lse, logits, num_kv_heads, sm_scale, backend,
      block_n=0, num_warps=0, num_stages=0):
    return None


@torch.library.custom_op(f"{NAMESPACE}::merge_partials", mutates_args=("out", "lse"))
def merge_partials(part_o: torch.Tensor, part_lse: torch.Tensor, slot_ptr: torch.Tensor, rotations: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, num_kv_heads: int, rotate_mask: int,
                   backend: str) -> None:
    fn = _pick(backend, _dec.merge_partials, _dec.merge_partials_reference)
    fn(part_o, part_lse, slot_ptr, rotations, out, _opt(lse), num_kv_heads=num_kv_heads, rotate_mask=rotate_mask)


@merge_partials.register_fake
def _(part_o, part_lse, slot_ptr, rotations, out, lse, num_kv_heads, rotate_mask, backend):
    return None


@torch.library.custom_op(f"{NAMESPACE}::encode_pages",
                         mutates_args=("k_codes", "k_radius", "k_mean", "v_codes", "v_scale", "v_zero"))
def encode_pages(k: torch.Tensor, v: torch.Tensor, page_ids: torch.Tensor, page_lens: torch.Tensor,
                 k_codes: torch.Tensor, k_radius: torch.Tensor, k_mean: torch.Tensor, v_codes: torch.Tensor,
                 v_scale: torch.Tensor, v_zero: torch.Tensor, config: str, backend: str) -> None:
    from sphkv_kernels import cpu_encode

    fn = _pick(backend, _enc.encode_pages, _enc.encode_pages_reference,
               cpu_encode.encode_pages_cpu if cpu_encode.available() else _enc.encode_pages_reference)
    fn(k, v, page_ids, page_lens, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, layout=layout_of(config))


@encode_pages.register_fake
def _(k, v, page_ids, page_lens, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, config, backend):
    return None
