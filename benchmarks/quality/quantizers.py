# SPDX-License-Identifier: Apache-2.0
"""Quantization baselines (fake-quant: dequantized tensors, exact stored bytes of the real format).

* ``full`` — the bf16 cache itself (16 bits per element).
* ``kivi-{b}`` — KIVI-style: keys per-channel asymmetric ``b``-bit over groups of ``group`` tokens,
  values per-token asymmetric ``b``-bit over groups of ``group`` channels, fp16 scale and zero per
  group, the last ``residual`` tokens (plus the remainder that fills no key group) kept dense bf16.
* ``turbo-{b}`` — TurboQuant-style (no QJL residual): fixed seeded Hadamard rotation, fp16 norm per
  token, each coordinate of the unit vector coded with the ``b``-bit Lloyd-Max codebook of
  ``N(0, 1/d)``; keys and values alike.
* ``polarquant-{b}`` — PolarQuant of Wu et al.: each RoPE pair ``(x_i, x_{i+d/2})`` of a key as
  (radius, angle), per group of ``group`` tokens and per pair an asymmetric uniform ``b``-bit code
  of each (fp16 min and step per group, pair and quantity); values per-token ``b``-bit groups of 64.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from sphkv.codebooks import lloyd_max
from sphkv.rotation import rotation_matrix
from sphkv_hf.segments import DenseSegment

from .methods import CompressedPrefix, PrefillContext, register

__all__ = ["Full", "Kivi", "Turbo", "PolarWu", "asym_quant"]


def asym_quant(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Round-to-nearest asymmetric ``bits``-bit quantization with fp16 min/scale over ``dim``; returns x̂."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / ((1 << bits) - 1)).to(torch.float16).to(torch.float32)
    lo = lo.to(torch.float16).to(torch.float32)
    q = torch.round((x - lo) / scale.clamp_min(1e-8)).clamp(0, (1 << bits) - 1)
    return lo + q * scale


def _mid_quant(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Uniform ``2**bits`` cells between fp16 min and max over ``dim``, reconstruct at cell centres."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    step = ((hi - lo) / (1 << bits)).to(torch.float16).to(torch.float32)
    lo = lo.to(torch.float16).to(torch.float32)
    q = torch.floor((x - lo) / step.clamp_min(1e-8)).clamp(0, (1 << bits) - 1)
    return lo + (q + 0.5) * step


def _per_token_groups(v: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    return asym_quant(v.unflatten(-1, (-1, group)), bits, -1).flatten(-2)


@dataclass(frozen=True)
class Full:
    name: str = "full"
    budget_fraction: float | None = None

    def build(self, ctx: PrefillContext) -> CompressedPrefix:
        return CompressedPrefix.of([[DenseSegment.build(k, v)] for k, v in zip(ctx.keys, ctx.values)], ctx)


@dataclass(frozen=True)
class Kivi:
    bits: int
    group: int = 64
    residual: int = 32
    name: str = "kivi"
    budget_fraction: float | None = None

    def _layer(self, k, v):
        b, h, n, d = k.shape
        nq = max(0, (n - self.residual) // self.group * self.group)
        kf, vf = k[..., :nq, :].float(), v[..., :nq, :].float()
        kq = asym_quant(kf.unflatten(-2, (-1, self.group)), self.bits, -2).flatten(-3, -2)   # per channel, token groups
        vq = _per_token_groups(vf, self.bits, self.group)
        code_bits = 2 * nq * d * self.bits
        meta = (nq // self.group) * d * 4 + nq * (d // self.group) * 4        # fp16 scale + zero per group
        nbytes = b * h * (code_bits // 8 + meta + (n - nq) * d * 4)
        kk = torch.cat([kq, k[..., nq:, :].float()], -2)
        vv = torch.cat([vq, v[..., nq:, :].float()], -2)
        return [DenseSegment.build(kk, vv, nbytes=nbytes)]

    def build(self, ctx: PrefillContext) -> CompressedPrefix:
        return CompressedPrefix.of([self._layer(k, v) for k, v in zip(ctx.keys, ctx.values)], ctx)


@functools.lru_cache(maxsize=16)
def gaussian_codebook(bits: int, head_dim: int) -> torch.Tensor:
    """Lloyd-Max centres ``[2**bits]`` for a coordinate of a uniform random unit vector, ≈ ``N(0, 1/d)``."""
    grid = torch.linspace(-6.0, 6.0, 24001, dtype=torch.float64)
    c = lloyd_max(grid, torch.exp(-grid * grid / 2), bits, -6.0, 6.0, iters=500)
    return (c / math.sqrt(head_dim)).to(torch.float32)


@dataclass(frozen=True)
class Turbo:
    bits: int
    seed: int = 0
    name: str = "turbo"
    budget_fraction: float | None = None

    def _code(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        r = rotation_matrix(d, self.seed)
        y = x.float() @ r.T
        norm = y.norm(dim=-1, keepdim=True).to(torch.float16).to(torch.float32)
        u = y / norm.clamp_min(1e-8)
        c = gaussian_codebook(self.bits, d)
        idx = torch.bucketize(u, (c[1:] + c[:-1]) / 2)
        return (c[idx] * norm) @ r

    def build(self, ctx: PrefillContext) -> CompressedPrefix:
        segs = []
        for k, v in zip(ctx.keys, ctx.values):
            b, h, n, d = k.shape
            nbytes = 2 * b * h * n * (d * self.bits // 8 + 2)
            segs.append([DenseSegment.build(self._code(k), self._code(v), nbytes=nbytes)])
        return CompressedPrefix.of(segs, ctx)


@dataclass(frozen=True)
class PolarWu:
    bits: int
    group: int = 128
    value_group: int = 64
    name: str = "polarquant"
    budget_fraction: float | None = None

    def _keys(self, k: torch.Tensor) -> torch.Tensor:
        b, h, n, d = k.shape
        kf = k.float()
        x, y = kf[..., : d // 2], kf[..., d // 2:]                  # RoPE pairs of the rotate-half layout
        r, phi = torch.sqrt(x * x + y * y), torch.remainder(torch.atan2(y, x), 2 * math.pi)
        pad = -n % self.group
        def grp(t):                                                  # [.., n, d/2] → [.., groups, G, d/2]
            return torch.nn.functional.pad(t, (0, 0, 0, pad), mode="replicate").unflatten(-2, (-1, self.group))
        rq = _mid_quant(grp(r), self.bits, -2).flatten(-3, -2)[..., :n, :]
        pq = _mid_quant(grp(phi), self.bits, -2).flatten(-3, -2)[..., :n, :]
        return torch.cat([rq * torch.cos(pq), rq * torch.sin(pq)], -1)

    def build(self, ctx: PrefillContext) -> CompressedPrefix:
        segs = []
        for k, v in zip(ctx.keys, ctx.values):
            b, h, n, d = k.shape
            groups = -(-n // self.group)
            kbytes = n * d * self.bits // 8 + groups * (d // 2) * 2 * 4      # fp16 min+step for r and φ per pair
            vbytes = n * d * self.bits // 8 + n * (d // self.value_group) * 4
            vq = _per_token_groups(v.float(), self.bits, self.value_group)
            segs.append([DenseSegment.build(self._keys(k), vq, nbytes=b * h * (kbytes + vbytes))])
        return CompressedPrefix.of(segs, ctx)


register("full", Full, quick=True, group="full")
for _b in (4, 3, 2):
    register(f"kivi-{_b}", functools.partial(Kivi, _b, name=f"kivi-{_b}"), group="kivi")
    register(f"turbo-{_b}", functools.partial(Turbo, _b, name=f"turbo-{_b}"), group="turbo")
    register(f"polarquant-{_b}", functools.partial(PolarWu, _b, name=f"polarquant-{_b}"),
             group="polarquant")
