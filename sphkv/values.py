# SPDX-License-Identifier: Apache-2.0
"""Per-token group quantization of values (optionally after the codec's rotation)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SphKVConfig
from .packing import pack_bits, packed_bytes, unpack_bits
from .rotation import rotation_matrix
from .validation import check_finite

__all__ = ["ValueCode", "GroupValueQuantizer", "quantize_groups", "dequantize_groups"]


def quantize_groups(x: torch.Tensor, bits: int, group: int, widths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Asymmetric ``bits``-bit integers per group of ``group`` coordinates (the one value quantizer).

    ``x`` ``[..., d]`` float32 (``d`` a multiple of ``group``) → (packed codes ``[..., ceil(d * bits / 8)]``
    uint8 in the :mod:`sphkv.packing` layout of ``widths`` ``[d]``, scale ``[..., d / group]`` float16,
    zero ``[..., d / group]`` float16); ``x ≈ zero + q * scale`` (:func:`dequantize_groups`).
    """
    levels = (1 << bits) - 1
    g = x.unflatten(-1, (x.shape[-1] // group, group))                 # [..., G, g]
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / levels).to(torch.float16)
    zero = lo.to(torch.float16)
    s = scale.to(torch.float32).clamp_min(1e-8)[..., None]
    q = torch.round((g - zero.to(torch.float32)[..., None]) / s).clamp(0, levels)
    return pack_bits(q.flatten(-2).to(torch.int64), widths), scale, zero


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      widths: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_groups` (the one value dequantizer): codes ``[..., nbytes]`` uint8, scale and
    zero ``[..., G]`` → ``[..., d]`` float32 (``d = widths.numel()``, groups of ``d / G`` coordinates)."""
    q = unpack_bits(codes, widths).to(torch.float32).unflatten(-1, (scale.shape[-1], -1))
    return (zero.to(torch.float32)[..., None] + q * scale.to(torch.float32)[..., None]).flatten(-2)


@dataclass(frozen=True)
class ValueCode:
    """Quantized values.

    codes : ``[..., N, ceil(d * bits / 8)]`` uint8 packed integers (bf16 bytes when ``bits == 16``).
    scale, zero : ``[..., N, d / group]`` float16 (empty last dim when ``bits == 16``); ``v ≈ zero + q * scale``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


class GroupValueQuantizer:
    """Asymmetric ``value_bits``-bit integers per group of ``value_group`` coordinates of a token.

    Examples
    --------
    >>> q = GroupValueQuantizer(SphKVConfig(value_bits=4, value_group=32))
    >>> v = torch.randn(3, 17, 64)
    >>> float((q.decode(q.encode(v)) - v).abs().max()) < 0.5
    True
    """

    def __init__(self, config: SphKVConfig):
        self.config = config
        d, b = config.head_dim, config.value_bits
        self.groups = d // config.value_group
        self.widths = torch.full((d,), min(b, 8), dtype=torch.int64)
        self.code_bytes = 2 * d if b == 16 else packed_bytes(self.widths)
        self.rotation = rotation_matrix(d, config.rotation_seed + 1) if config.value_rotate else None

    def stored_bytes(self, num_tokens: int) -> int:
        """Exact bytes for ``num_tokens`` values of one head: codes + fp16 scale and zero per group."""
        meta = 0 if self.config.value_bits == 16 else self.groups * 4
        return num_tokens * (self.code_bytes + meta)

    def to_storage_domain(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.rotation is None else v @ self.rotation.to(v.device).T

    def from_storage_domain(self, v: torch.Tensor) -> torch.Tensor:
        """Undo the value rotation on ``[..., d]`` (attention outputs are linear in values, so apply it once after ``p @ V``)."""
        return v if self.rotation is None else v @ self.rotation.to(v.device)

    def encode(self, v: torch.Tensor, *, name: str = "values") -> ValueCode:
        """``v`` ``[..., N, d]`` → :class:`ValueCode`."""
        if v.shape[-1] != self.config.head_dim:
            raise ValueError(f"{name} must be [..., N, {self.config.head_dim}], got {tuple(v.shape)}")
        v, _ = check_finite(v.to(torch.float32), name, self.config.nonfinite)
        v = self.to_storage_domain(v)
        b = self.config.value_bits
        if b == 16:
            empty = v.new_zeros(*v.shape[:-1], 0, dtype=torch.float16)
            return ValueCode(v.to(torch.bfloat16).view(torch.uint8), empty, empty)
        return ValueCode(*quantize_groups(v, b, self.config.value_group, self.widths))

    def decode_storage(self, code: ValueCode) -> torch.Tensor:
        """Values in the storage (rotated) domain ``[..., N, d]`` float32."""
        if self.config.value_bits == 16:
            return code.codes.view(torch.bfloat16).to(torch.float32)
        return dequantize_groups(code.codes, code.scale, code.zero, self.widths)

    def decode(self, code: ValueCode) -> torch.Tensor:
        """Values ``[..., N, d]`` float32 in the original domain."""
        return self.from_storage_domain(self.decode_storage(code))
