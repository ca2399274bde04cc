# SPDX-License-Identifier: Apache-2.0
"""Tier kinds: how a tier's page arena is built, written, read, poisoned, and attended.

Three kinds, chosen through the ``TIER_KINDS`` registry by :func:`tier_kind`:

* ``"dense"`` — bf16 keys and values (:class:`sphkv.tiers.Tier` without config, or a 16-bit
  :class:`sphkv.gridquant.GridTier`); arena :class:`sphkv.pool.TierPool`.
* ``"ada"`` — angle-coded keys + group-quantized values (:class:`sphkv.tiers.Tier` with a
  :class:`sphkv.config.SphKVConfig`); arena :class:`sphkv.pool.TierPool`; logits come from codes.
* ``"grid"`` — per-token grid integers (:class:`sphkv.gridquant.GridTier`); arena
  :class:`sphkv.gridquant.GridTierPool`.

Writes are batched per run of pages (the arena's own ``write_pages``): token ``i`` of a run goes to
page ``page_ids[i // P]``, slot ``i % P``, and ADA page means are those of the run's consecutive
``P``-token chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..gridquant import GridQuantizer, GridTier, GridTierPool
from ..keys import AngleKeyCodec
from ..logits import logits_from_codes
from ..pool import TierPool
from ..tiers import Tier
from ..values import GroupValueQuantizer

__all__ = ["TierKind", "TIER_KINDS", "tier_kind", "kind_of", "make_arena", "poison_page", "roundtrip", "PageBlock"]


@dataclass
class PageBlock:
    """What one tier's pages contribute to attention for one kv head.

    scores : ``[R, T]`` float32 scaled logits of the ``R`` query rows over the ``T`` tokens.
    values : ``[T, d]`` float32 values in the arena's storage domain.
    unrotate : maps ``weights @ values`` ``[R, d]`` back to the original value domain.
    """

    scores: torch.Tensor
    values: torch.Tensor
    unrotate: Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class TierKind:
    """Operations on the arena of one tier kind (subclass per kind; see ``TIER_KINDS``)."""

    def make(self, tier, num_pages: int, *, head_dim: int, page_size: int, device="cpu"):
        raise NotImplementedError

    def write(self, arena, page_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` ``[n, d]`` into pages ``page_ids`` ``[ceil(n / P)]`` int64, in order."""
        arena.write_pages(page_ids, k, v)

    def decode(self, arena, pages: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages ``[n]`` with lengths ``[n]`` → ``(k, v)`` ``[Σ lens, d]`` float32 in the original domain."""
        raise NotImplementedError

    def block(self, arena, pages: torch.Tensor, lens: torch.Tensor, q: torch.Tensor, scale: float) -> PageBlock:
        """Scores of queries ``q`` ``[R, d]`` over the pages' tokens; the tier's own code path."""
        k, v = self.decode(arena, pages, lens)
        return PageBlock((q @ k.T) * scale, v, _identity)

    def roundtrip(self, tier, k: torch.Tensor, v: torch.Tensor, *, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store-and-read ``k``, ``v`` ``[..., N, d]`` (consecutive tokens) → float32 reconstructions."""
        raise NotImplementedError


class DenseKind(TierKind):
    def make(self, tier, num_pages, *, head_dim, page_size, device="cpu"):
        return TierPool(Tier(tier.name), num_pages, head_dim=head_dim, page_size=page_size, device=device)

    def decode(self, arena, pages, lens):
        k, v = arena.read(pages, lens)
        return k.to(torch.float32), v.to(torch.float32)

    def roundtrip(self, tier, k, v, *, page_size):
        return k.to(torch.bfloat16).to(torch.float32), v.to(torch.bfloat16).to(torch.float32)


class AdaKind(TierKind):
    def make(self, tier, num_pages, *, head_dim, page_size, device="cpu"):
        return TierPool(tier, num_pages, head_dim=head_dim, page_size=page_size, device=device)

    def _read(self, arena, pages, lens):
        kc, vc, mean_tok = arena.read(pages, lens)                     # mean_tok [T, d] bf16 (rotated)
        return kc, vc, mean_tok.to(torch.float32)

    def decode(self, arena, pages, lens):
        kc, vc, mean_tok = self._read(arena, pages, lens)
        y = arena.kcodec.decode_rotated(kc) + mean_tok                  # [T, d] rotated domain
        return y @ arena.kcodec.rotation.to(y.device), arena.vquant.decode(vc)

    def block(self, arena, pages, lens, q, scale):
        kc, vc, mean_tok = self._read(arena, pages, lens)
        q_rot = arena.kcodec.rotate(q)                                  # [R, d]
        s = logits_from_codes(q_rot, kc, arena.kcodec, rotated=True) + q_rot @ mean_tok.T
        return PageBlock(s * scale, arena.vquant.decode_storage(vc), arena.vquant.from_storage_domain)

    def roundtrip(self, tier, k, v, *, page_size):
        kcodec, vquant = AngleKeyCodec(tier.config), GroupValueQuantizer(tier.config)
        return kcodec.decode(kcodec.encode(k)), vquant.decode(vquant.encode(v))


class GridKind(TierKind):
    def make(self, tier, num_pages, *, head_dim, page_size, device="cpu"):
        return GridTierPool(tier, num_pages, head_dim=head_dim, page_size=page_size, device=device)

    def decode(self, arena, pages, lens):
        return arena.read(pages, lens)

    def roundtrip(self, tier, k, v, *, page_size):
        quant = GridQuantizer(tier.bits, head_dim=k.shape[-1])
        return quant.roundtrip(k), quant.roundtrip(v)


TIER_KINDS: dict[str, TierKind] = {"dense": DenseKind(), "ada": AdaKind(), "grid": GridKind()}


def tier_kind(tier) -> str:
    """Name of the kind of ``tier`` (a key of ``TIER_KINDS``)."""
    if isinstance(tier, GridTier):
        return "dense" if tier.dense else "grid"
    if isinstance(tier, Tier):
        return "dense" if tier.dense else "ada"
    raise ValueError(f"tier {tier!r} is neither a sphkv.tiers.Tier nor a sphkv.gridquant.GridTier")


def kind_of(tier) -> TierKind:
    return TIER_KINDS[tier_kind(tier)]


def make_arena(tier, num_pages: int, *, head_dim: int, page_size: int, device="cpu"):
    """The page arena of ``tier`` (``num_pages`` pages, page 0 reserved as padding)."""
    return kind_of(tier).make(tier, num_pages, head_dim=head_dim, page_size=page_size, device=device)


def poison_page(arena, page: int) -> None:
    """Fill page ``page`` with NaN (float tensors) and 0xFF (code bytes): reading it yields NaN."""
    for t in arena.tensors().values():
        t[page] = float("nan") if t.is_floating_point() else 0xFF


def roundtrip(tier, k: torch.Tensor, v: torch.Tensor, *, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstructions of ``k``, ``v`` ``[..., N, d]`` stored at ``tier`` (float32)."""
    return kind_of(tier).roundtrip(tier, k, v, page_size=page_size)
