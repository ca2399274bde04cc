# SPDX-License-Identifier: Apache-2.0
"""Segments: the pieces a cache layer's stored prefix is made of.

A layer's prefix is an ordered list of segments; attention concatenates their logits (and the dense
tail's) before one softmax. Every segment holds ``N`` token slots per ``(batch, kv head)``; with
``lengths`` ``[B, Hkv]`` only the first ``lengths[b, h]`` slots of a row are real tokens (the rest is
padding, masked out), so each kv head may keep a different set of tokens — what Rate-Distortion
Retention produces. Positions are not needed by attention (keys are stored after RoPE); a segment
may carry them as metadata (``positions`` ``[B, Hkv, N]`` int64) for whoever drops or re-tiers tokens.

Two kinds, one interface (``logits`` then ``mix``):

* :class:`DenseSegment` — keys and values as tensors (bf16 tokens, or dequantized baselines that
  state their own exact ``nbytes``);
* :class:`CodedSegment` — ADA angle codes + quantized values; logits come from the codes
  (:func:`sphkv.logits_from_codes`), never from a dense key.

``nbytes`` is exact: everything the segment stores for all its ``(batch, kv head)`` rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sphkv import AngleKeyCodec, GroupValueQuantizer, KeyCode, ValueCode, logits_from_codes
from sphkv.tiers import PAGE_META_BYTES

__all__ = ["Segment", "DenseSegment", "CodedSegment", "dense_bytes", "coded_bytes"]


def _valid_mask(lengths: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``lengths`` ``[B, Hkv]`` → ``[B, Hkv, n]`` bool (None when every slot is valid)."""
    if lengths is None:
        return None
    return torch.arange(n, device=lengths.device) < lengths[..., None]


def _row_counts(lengths: torch.Tensor | None, b: int, h: int, n: int) -> list[int]:
    return [n] * (b * h) if lengths is None else [int(x) for x in lengths.flatten().tolist()]


def dense_bytes(counts: list[int], head_dim: int, *, page_size: int | None = None) -> int:
    """bf16 K and V of rows with ``counts`` tokens; with ``page_size``, plus page metadata per page."""
    meta = 0 if page_size is None else sum(-(-c // page_size) for c in counts) * PAGE_META_BYTES
    return sum(counts) * head_dim * 2 * 2 + meta


def coded_bytes(counts: list[int], kcodec: AngleKeyCodec, vquant: GroupValueQuantizer) -> int:
    """Exact bytes of coded rows with ``counts`` tokens: key codes, radii, page means, value codes,
    value scales/zeros and :data:`sphkv.tiers.PAGE_META_BYTES` per page."""
    p = kcodec.config.page_size
    return sum(kcodec.stored_bytes(c) + vquant.stored_bytes(c) + -(-c // p) * PAGE_META_BYTES
               for c in counts if c > 0)


@dataclass(frozen=True)
class Segment:
    """Base: ``N`` token slots per ``(batch, kv head)``; see the module docstring."""

    nbytes: int
    lengths: torch.Tensor | None = field(default=None, kw_only=True)
    positions: torch.Tensor | None = field(default=None, kw_only=True)

    @property
    def num_tokens(self) -> int:              # slots per row
        raise NotImplementedError

    def valid_mask(self) -> torch.Tensor | None:
        """``[B, Hkv, N]`` bool, or None when all slots are real tokens."""
        return _valid_mask(self.lengths, self.num_tokens)

    def logits(self, qg: torch.Tensor, scale: float) -> torch.Tensor:
        """``qg`` ``[B, Hkv, G*M, d]`` float32 → scaled logits ``[B, Hkv, G*M, N]`` float32 (padding → -inf)."""
        raise NotImplementedError

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        """Attention probabilities ``[B, Hkv, G*M, N]`` → ``p @ V`` ``[B, Hkv, G*M, d]`` float32."""
        raise NotImplementedError

    def _mask(self, s: torch.Tensor) -> torch.Tensor:
        m = self.valid_mask()
        return s if m is None else s.masked_fill(~m[:, :, None, :], float("-inf"))

    def _invisible_prefix(self, cutoff: int) -> int | None:
        """Leading slots whose positions (in every row) are ``< cutoff``; None when every valid slot is."""
        pos = self.positions
        valid = self.valid_mask()
        below = pos < cutoff if valid is None else (pos < cutoff) | ~valid
        if bool(below.all()):
            return None
        row = below.reshape(-1, below.shape[-1]).all(0)               # [N]: slot below cutoff in every row
        return int(row.to(torch.int64).cumprod(0).sum())

    def drop_before(self, cutoff: int) -> "Segment | None":
        """This segment without the slots at positions ``< cutoff`` that can be cut off (a sliding window moved
        past them): None when no slot is left, else the segment minus whole leading slots (whole pages for a
        coded segment). Padded per-head segments and segments without positions are kept whole or dropped whole."""
        if self.positions is None:
            return self
        n = self._invisible_prefix(cutoff)
        if n is None:
            return None
        if n == 0 or self.lengths is not None:
            return self
        return self._slice_from(n)

    def _slice_from(self, n: int) -> "Segment":
        """The slots ``n:`` (unpadded segments); a subclass may round ``n`` down to its storage unit."""
        raise NotImplementedError


@dataclass(frozen=True)
class DenseSegment(Segment):
    """Dense keys/values ``[B, Hkv, N, d]`` (any float dtype; math in float32).

    ``nbytes`` defaults to bf16 storage of the valid tokens without page metadata (a plain
    contiguous cache, 16 bits per element); pass ``page_size`` to :meth:`build` to count page
    metadata (kept tokens of a sparse cache), or an explicit ``nbytes`` for a fake-quant baseline.

    Examples
    --------
    >>> k = torch.randn(1, 2, 5, 8)
    >>> seg = DenseSegment.build(k, k)
    >>> seg.nbytes == 2 * 5 * 8 * 2 * 2, seg.num_tokens
    (True, 5)
    """

    k: torch.Tensor = None
    v: torch.Tensor = None
    page_size: int | None = None            # set by build(page_size=): whole pages, metadata counted

    @classmethod
    def build(cls, k: torch.Tensor, v: torch.Tensor, *, lengths: torch.Tensor | None = None,
              page_size: int | None = None, nbytes: int | None = None,
              positions: torch.Tensor | None = None) -> "DenseSegment":
        b, h, n, d = k.shape
        if nbytes is None:
            nbytes = dense_bytes(_row_counts(lengths, b, h, n), d, page_size=page_size)
        return cls(nbytes, k=k, v=v, lengths=lengths, positions=positions, page_size=page_size)

    @property
    def num_tokens(self) -> int:
        return self.k.shape[-2]

    def logits(self, qg: torch.Tensor, scale: float) -> torch.Tensor:
        return self._mask((qg @ self.k.to(torch.float32).transpose(-1, -2)) * scale)

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        return p @ self.v.to(torch.float32)

    def _slice_from(self, n: int) -> "DenseSegment":
        if self.page_size is not None:
            n = (n // self.page_size) * self.page_size       # a paged segment frees whole pages
            if n == 0:
                return self
        k, v = self.k[..., n:, :], self.v[..., n:, :]
        b, h, m, d = k.shape
        nbytes = dense_bytes([m] * (b * h), d, page_size=self.page_size)
        return DenseSegment(nbytes, k=k, v=v, positions=self.positions[..., n:], page_size=self.page_size)


@dataclass(frozen=True)
class CodedSegment(Segment):
    """ADA-coded keys and group-quantized values of ``N`` slots per row, starting on a page boundary.

    Examples
    --------
    >>> from sphkv import SphKVConfig
    >>> cfg = SphKVConfig.from_name("sphkv-4", head_dim=16, page_size=4, value_group=16)
    >>> kc, vq = AngleKeyCodec(cfg), GroupValueQuantizer(cfg)
    >>> seg = CodedSegment.encode(torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16), kc, vq)
    >>> seg.num_tokens, seg.logits(torch.randn(1, 2, 3, 16), 0.25).shape
    (6, torch.Size([1, 2, 3, 6]))
    """

    kcode: KeyCode = None
    vcode: ValueCode = None
    kcodec: AngleKeyCodec = None
    vquant: GroupValueQuantizer = None

    @classmethod
    def encode(cls, k: torch.Tensor, v: torch.Tensor, kcodec: AngleKeyCodec, vquant: GroupValueQuantizer, *,
               lengths: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> "CodedSegment":
        """Code ``k``, ``v`` ``[B, Hkv, N, d]``. With ``lengths``, each row's first ``lengths[b, h]`` slots are
        coded on their own (page means over real tokens only) and padding slots get zero codes."""
        b, h, n, d = k.shape
        if lengths is None:
            kcode, vcode = kcodec.encode(k), vquant.encode(v)
        else:
            kcode, vcode = cls._encode_rows(k, v, kcodec, vquant, lengths)
        nbytes = coded_bytes(_row_counts(lengths, b, h, n), kcodec, vquant)
        return cls(nbytes, kcode=kcode, vcode=vcode, kcodec=kcodec, vquant=vquant,
                   lengths=lengths, positions=positions)

    @staticmethod
    def _encode_rows(k, v, kcodec, vquant, lengths):
        b, h, n, d = k.shape
        p = kcodec.config.page_size
        codes = torch.zeros(b, h, n, kcodec.code_bytes, dtype=torch.uint8, device=k.device)
        radius = torch.zeros(b, h, n, dtype=torch.float16, device=k.device)
        mean = (torch.zeros(b, h, -(-n // p), d, dtype=torch.bfloat16, device=k.device)
                if kcodec.config.center == "page" else None)
        vfull = vquant.encode(torch.zeros_like(v[..., :1, :]).expand(b, h, n, d))
        vcodes, vscale, vzero = vfull.codes.clone(), vfull.scale.clone(), vfull.zero.clone()
        for i in range(b):
            for j in range(h):
                c = int(lengths[i, j])
                if c == 0:
                    continue
                kc, vc = kcodec.encode(k[i, j, :c]), vquant.encode(v[i, j, :c])
                codes[i, j, :c], radius[i, j, :c] = kc.codes, kc.radius
                if mean is not None:
                    mean[i, j, :kc.mean.shape[-2]] = kc.mean
                vcodes[i, j, :c], vscale[i, j, :c], vzero[i, j, :c] = vc.codes, vc.scale, vc.zero
        return KeyCode(codes, radius, mean), ValueCode(vcodes, vscale, vzero)

    @property
    def num_tokens(self) -> int:
        return self.kcode.num_tokens

    @property
    def full_pages(self) -> bool:
        """True when every row is whole pages (another segment of the same codecs may be appended)."""
        return self.lengths is None and self.num_tokens % self.kcodec.config.page_size == 0

    def logits(self, qg: torch.Tensor, scale: float) -> torch.Tensor:
        return self._mask(logits_from_codes(qg, self.kcode, self.kcodec) * scale)

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        return self.vquant.from_storage_domain(p @ self.vquant.decode_storage(self.vcode))

    def head(self, n: int) -> "CodedSegment":
        """The first ``n`` slots (``n`` a multiple of the page size; unpadded segments only)."""
        p = self.kcodec.config.page_size
        if self.lengths is not None or n % p or not 0 < n <= self.num_tokens:
            raise ValueError(f"head({n}) needs an unpadded segment and a whole number of pages (page_size={p})")
        kc, vc = self.kcode, self.vcode
        kcode = KeyCode(kc.codes[..., :n, :], kc.radius[..., :n], None if kc.mean is None else kc.mean[..., :n // p, :])
        vcode = ValueCode(vc.codes[..., :n, :], vc.scale[..., :n, :], vc.zero[..., :n, :])
        b, h = kc.codes.shape[:2]
        return CodedSegment(coded_bytes([n] * (b * h), self.kcodec, self.vquant), kcode=kcode, vcode=vcode,
                            kcodec=self.kcodec, vquant=self.vquant,
                            positions=None if self.positions is None else self.positions[..., :n])

    def _slice_from(self, n: int) -> "CodedSegment":
        p = self.kcodec.config.page_size
        n = (n // p) * p                                     # whole pages only (page means, page metadata)
        if n == 0:
            return self
        kc, vc = self.kcode, self.vcode
        kcode = KeyCode(kc.codes[..., n:, :], kc.radius[..., n:], None if kc.mean is None else kc.mean[..., n // p:, :])
        vcode = ValueCode(vc.codes[..., n:, :], vc.scale[..., n:, :], vc.zero[..., n:, :])
        b, h = kc.codes.shape[:2]
        return CodedSegment(coded_bytes([self.num_tokens - n] * (b * h), self.kcodec, self.vquant), kcode=kcode,
                            vcode=vcode, kcodec=self.kcodec, vquant=self.vquant, positions=self.positions[..., n:])

    def append(self, other: "CodedSegment") -> "CodedSegment":
        """This segment followed by ``other`` (same codecs, no padding, this one whole pages)."""
        if not (self.full_pages and other.lengths is None and other.kcodec is self.kcodec
                and other.vquant is self.vquant):
            raise ValueError("append needs unpadded segments of the same codecs, the first one whole pages")
        cat = lambda a, c: None if a is None else torch.cat([a, c], -2)  # noqa: E731
        kcode = KeyCode(cat(self.kcode.codes, other.kcode.codes), cat(self.kcode.radius[..., None],
                        other.kcode.radius[..., None])[..., 0], cat(self.kcode.mean, other.kcode.mean))
        vcode = ValueCode(*(cat(a, c) for a, c in zip((self.vcode.codes, self.vcode.scale, self.vcode.zero),
                                                       (other.vcode.codes, other.vcode.scale, other.vcode.zero))))
        pos = None if self.positions is None or other.positions is None else cat(self.positions[..., None],
                                                                                 other.positions[..., None])[..., 0]
        return CodedSegment(self.nbytes + other.nbytes, kcode=kcode, vcode=vcode, kcodec=self.kcodec,
                            vquant=self.vquant, positions=pos)
