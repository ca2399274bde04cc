# SPDX-License-Identifier: Apache-2.0
"""Compile-time description of one coded tier, as the Triton kernels see it.

A :class:`CodedLayout` is derived from the codecs of a :class:`sphkv.pool.TierPool` (or from an
:class:`~sphkv.AngleKeyCodec` and a :class:`~sphkv.GroupValueQuantizer`) and holds

* the ``tl.constexpr`` specialization of the kernels: head_dim, page size, per-level angle bits and
  bit offsets inside a key's packed code (``sphkv.packing`` layout), value bits/group, centering;
* small constant tensors: ``lut`` ``[Σ_l 2**bits_l, 2]`` float32 (cos, sin) of every level's angle
  centers (level 1 first); ``thr`` ``[Σ_l 2**bits_l, 4]`` float32 with (cos t, sin t, t < π, real)
  of the decision thresholds ``t`` (entries ``k < 2**bits_l - 1`` of a level are real, the last one
  is padding); the rotations ``key_rotation`` / ``value_rotation`` ``[d, d]`` float32
  (``x_rot = x @ R.T``).

Kernels index the LUT of level ``l`` at ``lut_offsets[l]``; level ``l`` (0-based) has
``head_dim >> (l + 1)`` angles of ``level_bits[l]`` bits starting at bit ``level_offsets[l]``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from sphkv.codebooks import thresholds as _thresholds
from sphkv.config import SphKVConfig
from sphkv.keys import AngleKeyCodec
from sphkv.values import GroupValueQuantizer

__all__ = ["CodedLayout", "MAX_LEVELS", "KERNEL_HEAD_DIMS"]

MAX_LEVELS = 8                      # head_dim <= 256
# head_dim 32 runs correctly under the interpreter but gave wrong partial outputs on an H100 with
# Triton 3.6 (benchmarks/kernels/NOTES.md); until diagnosed, layouts with d = 32 use the reference.
KERNEL_HEAD_DIMS = (64, 128, 256)


@dataclass(frozen=True, eq=False)
class CodedLayout:
    """Everything a coded-tier kernel needs to know about the codec (see module docstring).

    Examples
    --------
    >>> from sphkv import SphKVConfig, AngleKeyCodec, GroupValueQuantizer
    >>> cfg = SphKVConfig.from_name("sphkv-4", head_dim=64)
    >>> lay = CodedLayout.from_codecs(AngleKeyCodec(cfg), GroupValueQuantizer(cfg))
    >>> lay.level_bits, lay.level_offsets[:3], lay.key_code_bytes
    ((4, 3, 3, 3, 4, 4), (0, 128, 176), 28)
    >>> lay.lut.shape
    torch.Size([72, 2])
    """

    head_dim: int
    page_size: int
    level_bits: tuple[int, ...]
    level_offsets: tuple[int, ...]
    lut_offsets: tuple[int, ...]
    key_code_bytes: int
    value_bits: int
    value_group: int
    value_code_bytes: int
    num_value_groups: int
    has_mean: bool
    value_rotate: bool
    lut: torch.Tensor = field(repr=False)
    thr: torch.Tensor = field(repr=False)
    key_rotation: torch.Tensor = field(repr=False)
    value_rotation: torch.Tensor | None = field(repr=False)
    kcodec: AngleKeyCodec | None = field(default=None, repr=False)
    vquant: GroupValueQuantizer | None = field(default=None, repr=False)
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_codecs(cls, kcodec: AngleKeyCodec, vquant: GroupValueQuantizer) -> "CodedLayout":
        cfg = kcodec.config
        d = cfg.head_dim
        bits = tuple(int(b) for b in cfg.level_bits)
        sizes = [d >> (l + 1) for l in range(len(bits))]
        offs, o = [], 0
        for n, b in zip(sizes, bits):
            offs.append(o)
            o += n * b
        lut_offs, o = [], 0
        for b in bits:
            lut_offs.append(o)
            o += 1 << b
        lut = torch.cat([torch.stack([torch.cos(c.double()), torch.sin(c.double())], -1) for c in kcodec.centers])
        thr_rows = []
        for c in kcodec.centers:
            t = _thresholds(c.double())
            real = torch.ones_like(t)
            t = torch.cat([t, t.new_full((1,), math.pi)])          # padding entry, never counted
            real = torch.cat([real, real.new_zeros(1)])
            upper = (t < math.pi - 1e-9).to(torch.float64)
            thr_rows.append(torch.stack([torch.cos(t), torch.sin(t), upper, real], -1))
        vcfg = vquant.config
        nvg = vquant.groups if vcfg.value_bits != 16 else 0
        return cls(
            head_dim=d, page_size=cfg.page_size, level_bits=bits, level_offsets=tuple(offs),
            lut_offsets=tuple(lut_offs), key_code_bytes=kcodec.code_bytes,
            value_bits=vcfg.value_bits, value_group=vcfg.value_group, value_code_bytes=vquant.code_bytes,
            num_value_groups=nvg, has_mean=cfg.center == "page", value_rotate=vquant.rotation is not None,
            lut=lut.to(torch.float32), thr=torch.cat(thr_rows).to(torch.float32),
            key_rotation=kcodec.rotation.to(torch.float32),
            value_rotation=None if vquant.rotation is None else vquant.rotation.to(torch.float32),
            kcodec=kcodec, vquant=vquant)

    @classmethod
    def from_config(cls, config: SphKVConfig) -> "CodedLayout":
        """Layout of the default (analytic/uniform) codebooks of ``config``; cached per config."""
        return _layout_of_config(config)

    @classmethod
    def from_pool(cls, pool) -> "CodedLayout":
        """Layout of a coded :class:`sphkv.pool.TierPool`."""
        if pool.tier.dense:
            raise ValueError("a dense tier has no coded layout")
        return cls.from_config(pool.tier.config)

    @property
    def num_levels(self) -> int:
        return len(self.level_bits)

    @property
    def kernel_compiles(self) -> bool:
        """Whether the Triton kernels can be built for this layout at all (dot sizes >= 16)."""
        return self.head_dim >= 32 and self.page_size >= 16

    @property
    def kernel_supported(self) -> bool:
        """Whether the wrappers run the Triton decode kernel for this layout on GPU (else the reference)."""
        return self.head_dim in KERNEL_HEAD_DIMS and self.page_size >= 16

    def key_constexprs(self) -> dict:
        """``LB{l}``/``LO{l}``/``LT{l}`` (bits, bit offset, LUT offset) for levels 1..MAX_LEVELS (0 if absent)."""
        out = {}
        for l in range(MAX_LEVELS):
            have = l < self.num_levels
            out[f"LB{l + 1}"] = self.level_bits[l] if have else 0
            out[f"LO{l + 1}"] = self.level_offsets[l] if have else 0
            out[f"LT{l + 1}"] = self.lut_offsets[l] if have else 0
        return out

    def byte_lut(self) -> torch.Tensor:
        """``[256, 2 * E]`` float32: for every byte value, (cos, sin) of the ``E = 8 / level_bits[0]``
        level-1 centers it encodes, lowest field first (only meaningful when ``8 % level_bits[0] == 0``)."""
        w = self.level_bits[0]
        if 8 % w:
            return torch.zeros(1, 2)
        e = 8 // w
        v = torch.arange(256)
        codes = torch.stack([(v >> (w * t)) & ((1 << w) - 1) for t in range(e)], 1)       # [256, E]
        cs = self.lut[:1 << w]                                                          # level 1 (cos, sin)
        return cs[codes].reshape(256, 2 * e).to(torch.float32)

    def on(self, device) -> dict[str, torch.Tensor]:
        """The constant tensors on ``device`` (cached): ``lut`` (and its float16 copy ``lut16``), ``lut1``
        (:meth:`byte_lut`), ``thr``, ``key_rotation_t`` (``R.T``),
        ``value_rotation_t`` (``R_v.T``, identity if values are not rotated), ``value_rotation`` (``R_v``)."""
        key = str(torch.device(device))
        if key not in self._device_cache:
            eye = torch.eye(self.head_dim, dtype=torch.float32)
            rv = self.value_rotation if self.value_rotation is not None else eye
            self._device_cache[key] = {
                "lut": self.lut.to(device).contiguous(),
                "lut16": self.lut.to(torch.float16).to(device).contiguous(),
                "lut1": self.byte_lut().to(device).contiguous(),
                "thr": self.thr.to(device).contiguous(),
                "key_rotation_t": self.key_rotation.T.contiguous().to(device),
                "value_rotation_t": rv.T.contiguous().to(device),
                "value_rotation": rv.contiguous().to(device),
            }
        return self._device_cache[key]


@functools.lru_cache(maxsize=64)
def _layout_of_config(config: SphKVConfig) -> CodedLayout:
    return CodedLayout.from_codecs(AngleKeyCodec(config), GroupValueQuantizer(config))
