# SPDX-License-Identifier: Apache-2.0
"""Plain grid-quantized tiers (the RDKV-style baseline): per-token asymmetric integers for K and V.

A :class:`GridTier` keeps keys and values of a token as ``bits``-bit unsigned integers over the
whole head (one fp16 scale and one fp16 zero per token, for K and for V): ``x ≈ zero + q·scale``.
``bits=16`` is bf16 (dense). No rotation, no angles: this isolates what the angle codes add.
A grid tier duck-types as a :class:`sphkv.tiers.Tier` (``config`` is ``None``, ``page_bytes``),
so a :class:`sphkv.tiers.TierSet` can hold grid tiers; only the arena and codec differ.

Page layout of :class:`GridTierPool` (``P = page_size``, ``d = head_dim``, ``b = bits < 16``)::

    k_codes [num_pages, P, ceil(d*b/8)] uint8   (sphkv.packing layout)
    k_scale [num_pages, P] float16,  k_zero [num_pages, P] float16
    v_codes / v_scale / v_zero          the same for values
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import packed_bytes
from .pool import PageArena, token_slots
from .tiers import PAGE_META_BYTES, Tier, TierSet
from .values import dequantize_groups, quantize_groups

__all__ = ["GridTier", "GridQuantizer", "GridTierPool", "grid_tierset", "GRID_BITS"]

GRID_BITS = (2, 4, 8, 16)


@dataclass(frozen=True)
class GridTier:
    """A plain grid tier: ``bits`` ∈ ``GRID_BITS`` per key and value coordinate.

    Examples
    --------
    >>> GridTier("int4", 4).page_bytes(64, 64)
    4616
    """

    name: str
    bits: int

    def __post_init__(self) -> None:
        if self.bits not in GRID_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; allowed: {GRID_BITS}")

    @property
    def config(self) -> None:
        """Grid tiers have no :class:`sphkv.config.SphKVConfig`."""
        return None

    @property
    def dense(self) -> bool:
        return self.bits == 16

    def token_bytes(self, head_dim: int) -> int:
        """Exact bytes of one token's key + value for one head."""
        if self.dense:
            return head_dim * 2 * 2
        return 2 * (packed_bytes([self.bits] * head_dim) + 4)

    def page_bytes(self, head_dim: int, page_size: int) -> int:
        """Exact bytes of one full page for one (layer, kv head), metadata included."""
        return page_size * self.token_bytes(head_dim) + PAGE_META_BYTES

    def bytes_per_token(self, head_dim: int, page_size: int) -> float:
        return self.page_bytes(head_dim, page_size) / page_size


class GridQuantizer:
    """Per-token asymmetric ``bits``-bit quantization over ``head_dim`` coordinates.

    Examples
    --------
    >>> q = GridQuantizer(4, head_dim=64)
    >>> x = torch.randn(5, 64)
    >>> codes, scale, zero = q.encode(x)
    >>> float((q.decode(codes, scale, zero) - x).abs().max()) < 0.5
    True
    """

    def __init__(self, bits: int, *, head_dim: int):
        if bits not in GRID_BITS or bits == 16:
            raise ValueError(f"bits={bits!r} must be one of {GRID_BITS[:-1]} (16 is dense)")
        self.bits, self.head_dim = bits, head_dim
        self.widths = torch.full((head_dim,), bits, dtype=torch.int64)
        self.code_bytes = packed_bytes(self.widths)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``[..., d]`` → (codes ``[..., code_bytes]`` uint8, scale ``[...]`` fp16, zero ``[...]`` fp16)."""
        codes, scale, zero = quantize_groups(x.to(torch.float32), self.bits, self.head_dim, self.widths)
        return codes, scale[..., 0], zero[..., 0]                        # one group: the whole head

    def decode(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode` → ``[..., d]`` float32."""
        return dequantize_groups(codes, scale[..., None], zero[..., None], self.widths)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` ``[..., d]`` → float32."""
        return self.decode(*self.encode(x))


class GridTierPool(PageArena):
    """Fixed-size page arena of one coded :class:`GridTier` (see the module docstring for the layout).

    Page 0 is never handed out by allocators (padding page), as for :class:`sphkv.pool.TierPool`.

    Examples
    --------
    >>> pool = GridTierPool(GridTier("int8", 8), 4, head_dim=64, page_size=16)
    >>> pool.write(1, torch.randn(3, 64), torch.randn(3, 64))
    >>> k, v = pool.read(torch.tensor([1]), torch.tensor([3]))
    >>> k.shape
    torch.Size([3, 64])
    """

    def __init__(self, tier: GridTier, num_pages: int, *, head_dim: int, page_size: int, device="cpu"):
        if tier.dense:
            raise ValueError(f"tier {tier.name!r} is dense; use sphkv.pool.TierPool(Tier(name)) for it")
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages!r} must be >= 1")
        self.tier, self.num_pages, self.head_dim, self.page_size = tier, num_pages, head_dim, page_size
        self.quant = GridQuantizer(tier.bits, head_dim=head_dim)
        self.fields = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
        n, p, cb = num_pages, page_size, self.quant.code_bytes
        for side in ("k", "v"):
            setattr(self, f"{side}_codes", torch.zeros(n, p, cb, dtype=torch.uint8, device=device))
            setattr(self, f"{side}_scale", torch.zeros(n, p, dtype=torch.float16, device=device))
            setattr(self, f"{side}_zero", torch.zeros(n, p, dtype=torch.float16, device=device))

    def write_pages(self, page_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize ``k``, ``v`` ``[n, d]`` (consecutive tokens) into pages ``page_ids`` ``[ceil(n / P)]``, in order."""
        fields = []
        for side, x in (("k", k), ("v", v)):
            codes, scale, zero = self.quant.encode(x)
            fields += [(f"{side}_codes", codes), (f"{side}_scale", scale), (f"{side}_zero", zero)]
        self._put(page_ids, k.shape[0], fields)

    def read(self, pages: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages ``[n]`` with valid lengths ``[n]`` → dequantized ``(k, v)`` ``[Σ lens, d]`` float32."""
        sel = token_slots(pages, lens, self.page_size)
        out = []
        for side in ("k", "v"):
            c, s, z = (getattr(self, f"{side}_{f}").flatten(0, 1)[sel] for f in ("codes", "scale", "zero"))
            out.append(self.quant.decode(c, s, z))
        return out[0], out[1]


def grid_tierset(bits: tuple[int, ...] = (16, 8, 4, 2), *, head_dim: int = 64, page_size: int = 64) -> TierSet:
    """RDKV-style tiers, most precise first (``16`` → a dense :class:`Tier`); drop is implicit."""
    if list(bits) != sorted(bits, reverse=True) or len(set(bits)) != len(bits):
        raise ValueError(f"bits={bits!r} must be distinct and in decreasing order")
    tiers = tuple(Tier("bf16") if b == 16 else GridTier(f"int{b}", b) for b in bits)
    return TierSet(tiers, head_dim=head_dim, page_size=page_size)
