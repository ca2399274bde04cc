# SPDX-License-Identifier: Apache-2.0
"""Byte-plane evaluation of the sphkv packed codes for the CPU reference path.

The pool stores codes token-major, exactly in :mod:`sphkv.packing`'s layout (``[..., N, bytes]``).
Eager PyTorch on a CPU is slow at extracting 63 variable-width fields per token when each field
is a gather along the short last axis. Transposing a request's gathered codes once to byte planes
(``[..., bytes, N]``) turns every field extraction into whole-row shifts and masks over ``N``
tokens; the polar recurrence then runs token-major with one ``(cos, sin)`` table gather per level.

Keys are expanded *transiently* (per layer, per request, freed right after) into rotated-domain
vectors plus their page mean and multiplied with the rotated queries — the "expand codes in
registers, then use matrix units" evaluation DESIGN.md allows; nothing dense is ever stored in
the pool. Logits equal :func:`sphkv.logits.logits_lut` up to float rounding (tested).
"""
from __future__ import annotations

import torch

from sphkv.keys import AngleKeyCodec
from sphkv.packing import _offsets
from sphkv.values import GroupValueQuantizer

__all__ = ["FieldPlan", "KeyPlanes", "ValuePlanes"]


class FieldPlan:
    """Byte, shift and mask of each packed field (widths ``[F]``, 1..8 bits) for plane extraction.

    Examples
    --------
    >>> from sphkv.packing import pack_bits
    >>> w = torch.tensor([4, 3, 3, 6]); x = torch.tensor([[9, 5, 2, 33]])
    >>> FieldPlan(w).unpack(pack_bits(x, w).T).T.tolist()
    [[9, 5, 2, 33]]
    """

    def __init__(self, widths: torch.Tensor):
        w = widths.to(torch.int64).cpu()
        offs = _offsets(w)
        nbytes = (int(w.sum()) + 7) // 8
        self.lo = offs // 8
        self.hi = torch.clamp(self.lo + 1, max=nbytes - 1)
        self.shift = (offs % 8).to(torch.int32)[:, None]
        self.mask = ((1 << w) - 1).to(torch.int32)[:, None]
        self.single = bool(((offs % 8) + w <= 8).all())          # no field straddles a byte boundary

    def unpack(self, planes: torch.Tensor) -> torch.Tensor:
        """Byte planes ``[..., bytes, N]`` uint8 → fields ``[..., F, N]`` int32 (``unpack_bits`` layout)."""
        p = planes.to(torch.int32)
        word = p.index_select(-2, self.lo.to(p.device))
        if not self.single:
            word = word | (p.index_select(-2, self.hi.to(p.device)) << 8)
        return (word >> self.shift.to(p.device)) & self.mask.to(p.device)


class KeyPlanes:
    """Transient key expansion for one :class:`AngleKeyCodec`."""

    def __init__(self, codec: AngleKeyCodec):
        self.codec, self.sizes = codec, list(codec.sizes)
        self.plan = FieldPlan(codec.widths)
        self.cos_sin = [torch.stack([torch.cos(c), torch.sin(c)], -1) for c in codec.centers]   # [n_l, 2]

    def expand(self, codes: torch.Tensor, radius: torch.Tensor, mean: torch.Tensor | None,
               page_size: int) -> torch.Tensor:
        """Rotated-domain keys ``[H, N, d]`` float32 from codes ``[H, N, bytes]``, radius ``[H, N]`` and
        page means ``[H, N / page_size, d]`` (``N`` a whole number of pages)."""
        f = self.plan.unpack(codes.transpose(-1, -2)).transpose(1, 2)              # [H, N, F] int32
        rho = radius.to(torch.float32)[..., None]                                   # [H, N, 1]
        start = f.shape[-1] - self.sizes[-1]
        for lvl in range(len(self.sizes) - 1, -1, -1):                              # top level first
            idx = f[..., start:start + self.sizes[lvl]]                             # [H, N, n_l]
            cs = self.cos_sin[lvl].to(rho.device).index_select(0, idx.reshape(-1).long())
            rho = (rho[..., None] * cs.view(*idx.shape, 2)).flatten(-2)             # [H, N, 2 n_l]
            if lvl:
                start -= self.sizes[lvl - 1]
        if mean is not None:
            rho = rho + mean.to(torch.float32).repeat_interleave(page_size, 1)
        return rho


class ValuePlanes:
    """Transient value dequantization for one :class:`GroupValueQuantizer`."""

    def __init__(self, vquant: GroupValueQuantizer):
        self.vquant = vquant
        self.plan = FieldPlan(vquant.widths)

    def expand(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Values in the storage domain ``[H, N, d]`` float32 from ``[H, N, bytes]`` codes and ``[H, N, G]`` scales."""
        cfg = self.vquant.config
        if cfg.value_bits == 16:
            return codes.view(torch.bfloat16).to(torch.float32)
        q = self.plan.unpack(codes.transpose(-1, -2)).to(torch.float32)             # [H, d, N]
        g = cfg.value_group
        s = scale.to(torch.float32).transpose(1, 2).repeat_interleave(g, 1)          # [H, d, N]
        z = zero.to(torch.float32).transpose(1, 2).repeat_interleave(g, 1)
        return (z + q * s).transpose(1, 2)
