# SPDX-License-Identifier: Apache-2.0
"""Extend over a paged, tiered prefix with every key tile decoded once per block of new tokens: the schedule.

The prefix part of an extend (new tokens of request ``b`` attending to all of ``b``'s cached pages: no causal
mask inside the prefix) runs on the decode kernels' tensor-core form with a bigger query block. A program owns
one (request, kv head, page range, block of new tokens): its ``BLOCK_M`` query rows are ``BLOCK_M // G`` new
tokens times the ``G`` query heads of the kv head, so each coded key tile is expanded once and multiplied by the
whole block (``tl.dot``), instead of once per (new token, kv head) as a decode row per token does. Kernels:
:func:`sphkv_kernels.decode.coded_decode_partial` (``kernel="tc"``) and
:func:`~sphkv_kernels.decode.dense_decode_partial` with ``ext`` items; merge:
:func:`~sphkv_kernels.decode.merge_partials` over *virtual rows* ``v = token * num_kv_heads + kv_head``.

Slots: virtual row ``v`` of request row ``r = b * num_kv_heads + h`` owns as many slots as ``r`` has split-K work
items (all tiers), contiguous and tier-ordered like a decode row's, so ``slot_ptr[v, t]:slot_ptr[v, t + 1]`` are
its tier-``t`` states. A work item's token ``k`` writes slot ``work[w, 3] + k * ext[w, 2]`` (the stride is the
slots of all of ``b``'s kv heads per token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedule import schedule_decode

__all__ = ["ExtendTierWork", "ExtendSchedule", "schedule_extend", "extend_pages_per_split"]


@dataclass(frozen=True)
class ExtendTierWork:
    """Work of one tier.

    Attributes
    ----------
    work : ``[W, 4]`` int32 — ``(row, start, end, slot)``: request row ``row = b * num_kv_heads + h``, entries
        ``start:end`` of ``page_ids``, slot of the item's first token.
    ext : ``[W, 3]`` int32 — ``(tok0, ntok, slot_stride)``: the item's new tokens (rows of ``q``) and slot stride.
    page_ids, page_lens : ``[n]`` int32 — the tier's entries (as in :class:`~sphkv_kernels.schedule.TierWork`).
    """

    work: torch.Tensor
    ext: torch.Tensor
    page_ids: torch.Tensor
    page_lens: torch.Tensor

    def __post_init__(self):
        if self.work.shape[0] != self.ext.shape[0] or self.work.shape[1:] != (4,) or self.ext.shape[1:] != (3,):
            raise ValueError(f"work [W, 4] and ext [W, 3] must agree, got {tuple(self.work.shape)} "
                             f"and {tuple(self.ext.shape)}")

    @property
    def num_items(self) -> int:
        return self.work.shape[0]


@dataclass(frozen=True)
class ExtendSchedule:
    """Per-tier extend items plus the merge's slot map over virtual rows ``token * num_kv_heads + kv_head``."""

    num_q: int
    num_kv_heads: int
    num_tiers: int
    num_slots: int
    tokens_per_block: int
    tiers: tuple[ExtendTierWork, ...]
    slot_ptr: torch.Tensor           # [num_q * num_kv_heads, num_tiers + 1] int32

    def __post_init__(self):
        if self.tokens_per_block < 1:
            raise ValueError(f"tokens_per_block={self.tokens_per_block} must be >= 1")
        if self.slot_ptr.shape != (self.num_q * self.num_kv_heads, self.num_tiers + 1):
            raise ValueError(f"slot_ptr must be [{self.num_q * self.num_kv_heads}, {self.num_tiers + 1}], "
                             f"got {tuple(self.slot_ptr.shape)}")


def _excl_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def extend_pages_per_split(qo_indptr: torch.Tensor, indptr: torch.Tensor, *, num_kv_heads: int,
                           tokens_per_block: int, target_programs: int) -> int:
    """Pages per split-K item so that about ``target_programs`` programs run: no split when the token blocks alone
    (``sum_b ceil(q_len_b / tokens_per_block) * num_kv_heads``) reach the target, else each row cut in
    ``ceil(target / blocks)`` pieces."""
    q_len = (qo_indptr[1:] - qo_indptr[:-1]).to(torch.int64).cpu()
    blocks = int(((q_len + tokens_per_block - 1) // tokens_per_block).sum()) * num_kv_heads
    counts = (indptr[1:] - indptr[:-1]).to(torch.int64).cpu()
    longest = int(counts.max()) if counts.numel() else 1
    pieces = max(1, -(-target_programs // max(1, blocks)))
    return max(1, -(-longest // pieces))


def schedule_extend(qo_indptr: torch.Tensor, indptr: torch.Tensor, page_tiers: torch.Tensor, indices: torch.Tensor,
                    page_lens: torch.Tensor, *, num_kv_heads: int, num_tiers: int, pages_per_split: int,
                    tokens_per_block: int, device=None) -> ExtendSchedule:
    """Build the :class:`ExtendSchedule` (host work; tensors end on ``device``).

    Parameters
    ----------
    qo_indptr : ``[B + 1]`` int — request ``b``'s new tokens are rows ``qo_indptr[b]:qo_indptr[b + 1]`` of ``q``.
    indptr, page_tiers, indices, page_lens : the prefix pages per request row ``b * num_kv_heads + h``, as in
        :func:`sphkv_kernels.schedule.schedule_decode` (whose split-K items are cut here by token blocks).
    tokens_per_block : new tokens per program (``block_m // G``).

    Examples
    --------
    >>> s = schedule_extend(torch.tensor([0, 3]), torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([4, 5]),
    ...                     torch.tensor([16, 7]), num_kv_heads=1, num_tiers=2, pages_per_split=8, tokens_per_block=2)
    >>> s.num_slots, s.slot_ptr.tolist()
    (6, [[0, 1, 2], [2, 3, 4], [4, 5, 6]])
    >>> s.tiers[1].work.tolist(), s.tiers[1].ext.tolist()
    ([[0, 0, 1, 1], [0, 0, 1, 5]], [[0, 2, 2], [2, 1, 2]])
    """
    if tokens_per_block < 1:
        raise ValueError(f"tokens_per_block={tokens_per_block} must be >= 1")
    qo = qo_indptr.to(torch.int64).cpu()
    batch = qo.numel() - 1
    rows = indptr.numel() - 1
    if rows != batch * num_kv_heads:
        raise ValueError(f"indptr has {rows} rows; expected batch_size * num_kv_heads = {batch} * {num_kv_heads}")
    q_len = qo[1:] - qo[:-1]
    if bool((q_len < 0).any()):
        raise ValueError("qo_indptr must be non-decreasing")
    dec = schedule_decode(indptr, page_tiers, indices, page_lens, num_tiers=num_tiers,
                          pages_per_split=pages_per_split)
    sp = dec.slot_ptr.to(torch.int64)                                       # [R, T + 1]
    nslots_r = sp[:, -1] - sp[:, 0]                                         # slots per request row
    num_q = int(qo[-1])
    tok = torch.arange(num_q)
    b_of_tok = torch.repeat_interleave(torch.arange(batch), q_len)
    r_of_v = (b_of_tok[:, None] * num_kv_heads + torch.arange(num_kv_heads)).reshape(-1)      # [num_q * Hkv]
    vbase = _excl_cumsum(nslots_r[r_of_v])
    slot_ptr = vbase[:, None] + (sp[r_of_v] - sp[r_of_v, :1])
    stride_b = nslots_r.view(batch, num_kv_heads).sum(1)                   # slots per token of request b
    nblk = (q_len + tokens_per_block - 1) // tokens_per_block              # [B]
    tiers = []
    for tw in dec.tiers:
        w = tw.work.to(torch.int64)
        b = w[:, 0] // num_kv_heads
        h = w[:, 0] % num_kv_heads
        reps = nblk[b]
        wid = torch.repeat_interleave(torch.arange(w.shape[0]), reps)
        k = torch.arange(wid.numel()) - torch.repeat_interleave(_excl_cumsum(reps), reps)
        bw = b[wid]
        tok0 = qo[bw] + k * tokens_per_block
        ntok = torch.minimum(torch.full_like(tok0, tokens_per_block), qo[bw + 1] - tok0)
        slot = vbase[tok0 * num_kv_heads + h[wid]] + (w[wid, 3] - sp[w[wid, 0], 0])
        work = torch.stack([w[wid, 0], w[wid, 1], w[wid, 2], slot], 1)
        ext = torch.stack([tok0, ntok, stride_b[bw]], 1)
        tiers.append(ExtendTierWork(work=work.to(torch.int32).contiguous().to(device),
                                    ext=ext.to(torch.int32).contiguous().to(device),
                                    page_ids=tw.page_ids.to(device), page_lens=tw.page_lens.to(device)))
    del tok
    return ExtendSchedule(num_q=num_q, num_kv_heads=num_kv_heads, num_tiers=num_tiers,
                          num_slots=int(nslots_r[r_of_v].sum()), tokens_per_block=tokens_per_block,
                          tiers=tuple(tiers), slot_ptr=slot_ptr.to(torch.int32).contiguous().to(device))
