# SPDX-License-Identifier: Apache-2.0
"""ADA methods: the whole context coded as angle-code pages (logits from codes at scoring time).

* ``sphkv-{8,4,3,2}`` — the presets of :data:`sphkv.config.PRESETS` as they stand.
* ``sphkv-{5b,4b,3b,2b}`` — presets tuned on this harness (bits moved from values to keys), and
  ``sphkv-{5b,4b,3b,2b}+sink`` the same with the first ``SINK`` = 4 tokens of every layer dense;
  ``sphkv-2b-lo+sink`` the low end (1.5 angle bits per coordinate, 128-token pages, ~2.2 bits).
* variants to measure what matters: ``-nocenter`` (no page-mean centering) and ``+sink`` (the first
  ``SINK`` tokens of every layer kept dense bf16, as the cache's ``CachePolicy(dense_sink=SINK)``
  does; coded pages start after them) on the three core presets; on ``sphkv-4`` also ``-uniform``
  (uniform instead of Lloyd-Max codebooks for the higher levels), ``-fitted`` (per-level Lloyd-Max
  fitted to this context's own angles, online like PolarQuant-R) and ``-sinkpage`` (the whole first
  page dense); ``sphkv-4b`` without the sinks.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from sphkv import AngleKeyCodec, GroupValueQuantizer, SphKVConfig, fit_codebook
from sphkv.codebooks import optimal_level_bits
from sphkv_hf.segments import CodedSegment, DenseSegment

from .methods import CompressedPrefix, PrefillContext, register

__all__ = ["Ada"]


def _level_samples(y: torch.Tensor, max_samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per polar level: (angles, squared node radii) of keys ``y`` ``[T, d]``, each flattened and
    strided down to at most ``max_samples`` values (a key's error from an angle error δψ is ρ_node²·δψ²)."""
    out = []
    even, odd = y[..., 0::2], y[..., 1::2]
    rho = torch.sqrt(even * even + odd * odd)
    ang, w = torch.remainder(torch.atan2(odd, even), 2 * torch.pi), rho * rho
    while True:
        step = max(1, ang.numel() // max_samples)
        out.append((ang.flatten()[::step], w.flatten()[::step]))
        if rho.shape[-1] == 1:
            return out
        a, b = rho[..., 0::2], rho[..., 1::2]
        rho = torch.sqrt(a * a + b * b)
        ang, w = torch.atan2(b, a), rho * rho


def _fitted_codec(cfg: SphKVConfig, keys: list[torch.Tensor], max_samples: int = 20000) -> AngleKeyCodec:
    """Codec whose per-level codebooks are weighted Lloyd-Max fitted to this context's rotated (and
    page-centered) keys, sampled from every 4th layer."""
    base = AngleKeyCodec(cfg)
    y = torch.cat([base.rotate(k[0]).flatten(0, 1) for k in keys[::4]], 0)          # [T, d]
    if cfg.center == "page":
        n = y.shape[0] // cfg.page_size * cfg.page_size
        y = y[:n].unflatten(0, (-1, cfg.page_size))
        y = (y - y.mean(1, keepdim=True)).flatten(0, 1)
    books = [fit_codebook(a, l + 1, b, weights=w)
             for l, ((a, w), b) in enumerate(zip(_level_samples(y, max_samples), cfg.level_bits))]
    return AngleKeyCodec(cfg, codebooks=books)


@dataclass(frozen=True)
class Ada:
    preset: str
    overrides: dict = field(default_factory=dict)
    sink: int = 0                     # first tokens of each layer kept dense bf16
    fitted: bool = False
    angle_bits: float | None = None   # replaces the preset's angle bits per key coordinate (levels from head_dim)
    name: str = "sphkv"
    budget_fraction: float | None = None
    _memo: dict = field(default_factory=dict, compare=False, repr=False)   # id(ctx) → (ctx, codecs, coded segs)

    def config(self, head_dim: int) -> SphKVConfig:
        over = dict(self.overrides)
        if self.angle_bits is not None:     # allocated over this head_dim's polar levels, as a preset does
            over["level_bits"] = optimal_level_bits(head_dim, self.angle_bits)
        return SphKVConfig.from_name(self.preset, head_dim=head_dim, **over)

    def _reusable(self, ctx: PrefillContext, page_size: int):
        """(coded segments of ``ctx.base``, number of leading coded tokens that are whole shared pages)."""
        hit = self._memo.get(id(ctx.base)) if ctx.base is not None else None
        if hit is None or hit[0] is not ctx.base:
            return None, 0
        return hit, max(0, ctx.shared - self.sink) // page_size * page_size

    def build(self, ctx: PrefillContext) -> CompressedPrefix:
        """Sinks dense, the rest coded. Pages a needle context shares whole with its base are taken from
        the base's encoding (bit-identical to encoding them again: codes and page means are page-local)."""
        cfg = self.config(ctx.head_dim)
        p = cfg.page_size
        hit, reuse = (None, 0) if self.fitted else self._reusable(ctx, p)
        kcodec, vquant = hit[1] if hit else (_fitted_codec(cfg, ctx.keys) if self.fitted else AngleKeyCodec(cfg),
                                             GroupValueQuantizer(cfg))
        segs, coded = [], []
        for l, (k, v) in enumerate(zip(ctx.keys, ctx.values)):
            layer = []
            if self.sink:
                s = self.sink
                layer.append(DenseSegment.build(k[..., :s, :], v[..., :s, :], page_size=p))
                k, v = k[..., s:, :], v[..., s:, :]
            if reuse and reuse < k.shape[-2]:
                seg = hit[2][l].head(reuse).append(CodedSegment.encode(k[..., reuse:, :], v[..., reuse:, :],
                                                                       kcodec, vquant))
            else:
                seg = CodedSegment.encode(k, v, kcodec, vquant)
            layer.append(seg)
            coded.append(seg)
            segs.append(layer)
        if ctx.base is None:
            self._memo[id(ctx)] = (ctx, (kcodec, vquant), coded)
        return CompressedPrefix.of(segs, ctx)


def _reg(name: str, quick: bool = False, group: str = "sphkv", **kw) -> None:
    register(name, functools.partial(Ada, name=name, **kw), quick=quick, group=group)


SINK = 4
for _p in ("sphkv-4", "sphkv-3", "sphkv-2"):          # the core presets as they stand, and what moves them
    _reg(_p, preset=_p)
    _reg(f"{_p}+sink", group="sphkv+sink", preset=_p, sink=SINK)
    _reg(f"{_p}-nocenter", group="sphkv-nocenter", preset=_p, overrides={"center": "none"})
_reg("sphkv-4-uniform", group="sphkv-4 variants", preset="sphkv-4", overrides={"codebook": "uniform"})
_reg("sphkv-4-fitted", group="sphkv-4 variants", preset="sphkv-4", fitted=True)
_reg("sphkv-4-sinkpage", group="sphkv-4 variants", preset="sphkv-4", sink=64)
for _p in ("sphkv-5b", "sphkv-4b", "sphkv-3b", "sphkv-2b"):   # tuned presets, with the sinks
    _reg(f"{_p}+sink", quick=_p == "sphkv-4b", group="sphkv-b+sink", preset=_p, sink=SINK)
_reg("sphkv-2b-lo+sink", group="sphkv-b+sink", preset="sphkv-2b", sink=SINK,   # the low end, ~2.2 bits
     overrides={"level_bits": (2, 1, 1, 1, 1, 2), "page_size": 128})
_reg("sphkv-4b", group="sphkv-4 variants", preset="sphkv-4b")                 # tuned, without the sinks
_reg("sphkv-8", group="sphkv-8", preset="sphkv-8")
# Successor candidates of sphkv-4b+sink at <= 4.5 bits/element (issue 12: needle hits equal to full on every
# model and corpus): more angle bits with 3-bit values, or 4-bit values (the latter ~4.5 at head_dim 64).
_reg("sphkv-a4.5v3+sink", group="sphkv-b+sink", preset="sphkv-4b", sink=SINK, angle_bits=4.5)
_reg("sphkv-a4.75v3+sink", group="sphkv-b+sink", preset="sphkv-4b", sink=SINK, angle_bits=4.75)
_reg("sphkv-a4v4+sink", group="sphkv-b+sink", preset="sphkv-4b", sink=SINK, overrides={"value_bits": 4})
_reg("sphkv-a3.75v4+sink", group="sphkv-b+sink", preset="sphkv-4b", sink=SINK, angle_bits=3.75,
     overrides={"value_bits": 4})
