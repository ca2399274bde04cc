# SPDX-License-Identifier: Apache-2.0
"""Bit packing of small unsigned codes into a little-endian byte stream (one stream per token).

Layout: field ``j`` of width ``w_j`` starts at bit ``o_j = sum(w_<j)``; bit ``t`` of the stream is bit
``t % 8`` of byte ``t // 8``. A field never exceeds 8 bits, so it spans at most two bytes; readers
fetch ``byte[o//8] | byte[min(o//8+1, nbytes-1)] << 8`` and shift/mask.
"""
from __future__ import annotations

import torch

__all__ = ["packed_bytes", "pack_bits", "unpack_bits"]


def packed_bytes(widths: torch.Tensor | list[int]) -> int:
    """Bytes needed to store fields of the given bit widths."""
    return (int(sum(int(w) for w in widths)) + 7) // 8


def _offsets(widths: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(widths, 0) - widths


def pack_bits(codes: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Pack ``codes`` ``[..., F]`` (int, ``0 <= code < 2**width``) into ``[..., nbytes]`` uint8.

    ``widths`` is ``[F]`` int64 with values in 1..8.
    """
    widths = widths.to(torch.int64).cpu()
    nbytes = packed_bytes(widths)
    offs = _offsets(widths).to(codes.device)
    c = codes.to(torch.int64) & ((1 << widths.to(codes.device)) - 1)
    shifted = c << (offs % 8)                                   # [..., F] up to 15 bits
    lo_idx = (offs // 8).expand_as(c)
    hi_idx = torch.clamp(offs // 8 + 1, max=nbytes - 1).expand_as(c)
    out = torch.zeros(*codes.shape[:-1], nbytes, dtype=torch.int64, device=codes.device)
    out.scatter_add_(-1, lo_idx, shifted & 0xFF)
    hi = shifted >> 8
    out.scatter_add_(-1, hi_idx, hi)                            # hi is 0 when the field fits one byte
    return out.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[..., nbytes]`` uint8 → ``[..., F]`` int64."""
    widths = widths.to(torch.int64).to(packed.device)
    nbytes = packed.shape[-1]
    offs = _offsets(widths)
    p = packed.to(torch.int64)
    lo = p[..., offs // 8]
    hi = p[..., torch.clamp(offs // 8 + 1, max=nbytes - 1)]
    word = lo | (hi << 8)
    return (word >> (offs % 8)) & ((1 << widths) - 1)
