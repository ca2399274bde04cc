# SPDX-License-Identifier: Apache-2.0
"""Page storage for one tier: the tensors the decode kernels read.

A page holds up to ``page_size`` consecutive kept tokens of one (layer, kv head), all of one tier.
Coded-tier tensors (``P = page_size``, ``d = head_dim``)::

    k_codes  [num_pages, P, key_code_bytes]  uint8    packed angle codes (sphkv.packing layout)
    k_radius [num_pages, P]                  float16  radius of the rotated, page-centered key
    k_mean   [num_pages, d]                  bfloat16 page mean (rotated domain); zeros if center="none"
    v_codes  [num_pages, P, value_code_bytes] uint8   packed value integers (rotated domain if value_rotate)
    v_scale  [num_pages, P, d / value_group] float16
    v_zero   [num_pages, P, d / value_group] float16

Dense-tier tensors: ``k`` and ``v`` ``[num_pages, P, d]`` bfloat16. Which tokens of a page are
valid (``page_len``), where they came from and which tier a page is are metadata kept by the
page table, not here. Page 0 is never handed out by allocators (a padding page, as in SGLang).
"""
from __future__ import annotations

import torch

from .keys import AngleKeyCodec, KeyCode
from .tiers import Tier
from .values import GroupValueQuantizer, ValueCode

__all__ = ["TierPool", "PageArena", "token_slots", "run_slots"]


def token_slots(pages: torch.Tensor, lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Rows of the flattened ``[num_pages * P, ...]`` arena holding the first ``lens[i]`` tokens of each of
    ``pages`` ``[n]``, in order → ``[Σ lens]`` int64 (CPU)."""
    pages, lens = pages.to("cpu", torch.int64), lens.to("cpu", torch.int64)
    start = torch.cumsum(lens, 0) - lens                                  # first token of each page in the run
    return torch.repeat_interleave(pages * page_size - start, lens) + torch.arange(int(lens.sum()))


def run_slots(page_ids: torch.Tensor, n: int, page_size: int) -> torch.Tensor:
    """Row ``page * P + j`` of the flattened arena for token ``i`` of a run of ``n`` consecutive tokens written
    to ``page_ids`` ``[ceil(n / P)]`` (token ``i`` → page ``page_ids[i // P]``, slot ``i % P``) → ``[n]`` int64."""
    i = torch.arange(n, device=page_ids.device)
    return page_ids.to(torch.int64)[i // page_size] * page_size + i % page_size


class PageArena:
    """Base of the page arenas: ``fields`` names the tensors, each ``[num_pages, ...]``; a subclass writes
    runs of tokens (:meth:`write_pages`) and reads pages back (``read``)."""

    fields: tuple[str, ...] = ()
    page_size: int

    def write_pages(self, page_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` ``[n, d]`` (consecutive tokens) into pages ``page_ids`` ``[ceil(n / P)]``, in order."""
        raise NotImplementedError

    def write(self, page: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` ``[n, d]`` (``1 <= n <= page_size``) into page ``page`` (slots ``0..n-1``)."""
        n = k.shape[0]
        if not 1 <= n <= self.page_size:
            raise ValueError(f"a page holds 1..{self.page_size} tokens, got {n}")
        device = next(iter(self.tensors().values())).device
        self.write_pages(torch.tensor([page], dtype=torch.int64, device=device), k, v)

    def _put(self, page_ids: torch.Tensor, n: int, fields) -> None:
        """Store per-token ``fields`` (``(name, [n, ...])``) of a run of ``n`` tokens into ``page_ids``."""
        p = self.page_size
        if n % p == 0:                                                  # whole pages: one row per page
            for name, x in fields:
                getattr(self, name)[page_ids] = x.unflatten(0, (n // p, p))
            return
        sel = run_slots(page_ids, n, p)
        for name, x in fields:
            getattr(self, name).flatten(0, 1)[sel] = x

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.fields}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class TierPool(PageArena):
    """Fixed-size page arena of one :class:`Tier`."""

    def __init__(self, tier: Tier, num_pages: int, *, head_dim: int, page_size: int, device="cpu"):
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages!r} must be >= 1")
        self.tier, self.num_pages, self.head_dim, self.page_size = tier, num_pages, head_dim, page_size
        n, p, d = num_pages, page_size, head_dim
        self.fields = ("k", "v") if tier.dense else ("k_codes", "k_radius", "k_mean", "v_codes", "v_scale", "v_zero")
        if tier.dense:
            self.k = torch.zeros(n, p, d, dtype=torch.bfloat16, device=device)
            self.v = torch.zeros(n, p, d, dtype=torch.bfloat16, device=device)
            return
        self.kcodec, self.vquant = AngleKeyCodec(tier.config), GroupValueQuantizer(tier.config)
        g = self.vquant.groups if tier.config.value_bits != 16 else 0
        self.k_codes = torch.zeros(n, p, self.kcodec.code_bytes, dtype=torch.uint8, device=device)
        self.k_radius = torch.zeros(n, p, dtype=torch.float16, device=device)
        self.k_mean = torch.zeros(n, d, dtype=torch.bfloat16, device=device)
        self.v_codes = torch.zeros(n, p, self.vquant.code_bytes, dtype=torch.uint8, device=device)
        self.v_scale = torch.zeros(n, p, g, dtype=torch.float16, device=device)
        self.v_zero = torch.zeros(n, p, g, dtype=torch.float16, device=device)

    def write_pages(self, page_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` ``[n, d]`` into pages ``page_ids`` (dense: bf16; coded: encoded, page means over each
        page's tokens of the run)."""
        n = k.shape[0]
        if self.tier.dense:
            self._put(page_ids, n, (("k", k.to(torch.bfloat16)), ("v", v.to(torch.bfloat16))))
            return
        kc, vc = self.kcodec.encode(k), self.vquant.encode(v)          # codes [n, cb], mean [pages, d]
        self.k_mean[page_ids] = kc.mean if kc.mean is not None else torch.zeros_like(self.k_mean[page_ids])
        self._put(page_ids, n, (("k_codes", kc.codes), ("k_radius", kc.radius), ("v_codes", vc.codes),
                                ("v_scale", vc.scale), ("v_zero", vc.zero)))

    def read(self, pages: torch.Tensor, lens: torch.Tensor):
        """Pages ``[n]`` with valid lengths ``[n]`` → dense-tier ``(k, v)`` ``[T, d]`` or ``(KeyCode, ValueCode)`` of ``T = Σ lens`` tokens.

        Coded keys come back with one mean per token-page, so ``KeyCode.mean`` is ``None`` and the
        caller gets ``(KeyCode, ValueCode, mean_per_token [T, d])``.
        """
        sel = token_slots(pages, lens, self.page_size)
        flat = lambda t: t.flatten(0, 1)[sel.to(t.device)]  # noqa: E731
        if self.tier.dense:
            return flat(self.k), flat(self.v)
        kc = KeyCode(codes=flat(self.k_codes), radius=flat(self.k_radius), mean=None)
        vc = ValueCode(codes=flat(self.v_codes), scale=flat(self.v_scale), zero=flat(self.v_zero))
        page_of = torch.repeat_interleave(pages.to("cpu", torch.int64), lens.to("cpu", torch.int64))
        return kc, vc, self.k_mean[page_of.to(self.k_mean.device)]
