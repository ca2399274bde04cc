# SPDX-License-Identifier: Apache-2.0
"""Split-K work schedule of a paged decode batch (pure PyTorch; built once per batch in ``plan``).

Vocabulary (FlashInfer's, with one page list per (request, kv head), since a page holds one kv head):

* ``row = request * num_kv_heads + kv_head``; ``indptr`` ``[num_rows + 1]`` delimits each row's
  entries in ``indices`` (page ids, one id space per tier arena) and ``page_tiers`` (tier index of
  each entry); ``page_lens`` ``[nnz]`` is the number of valid tokens of each entry.
* The schedule groups each row's entries by tier (order inside a tier preserved) and cuts every
  (row, tier) group into chunks of at most ``pages_per_split`` pages: one *work item* each,
  ``(row, start, end, slot)`` with ``start:end`` indexing the tier's compacted page list. Slots are
  numbered row-major, tier-minor, so ``slot_ptr[row, t]:slot_ptr[row, t + 1]`` are the partial
  states of ``row`` in tier ``t`` — what the merge kernel reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TierWork", "DecodeSchedule", "schedule_decode", "entry_page_lens"]


@dataclass(frozen=True)
class TierWork:
    """Work of one tier.

    Attributes
    ----------
    work : ``[W, 4]`` int32 — ``(row, start, end, slot)``, longest items first.
    page_ids : ``[n]`` int32 — the tier's entries (page ids in its arena), grouped by row.
    page_lens : ``[n]`` int32 — valid tokens of each entry.
    entry_index : ``[n]`` int64 — position of each entry in the plan's ``indices``.
    """

    work: torch.Tensor
    page_ids: torch.Tensor
    page_lens: torch.Tensor
    entry_index: torch.Tensor

    @property
    def num_items(self) -> int:
        return self.work.shape[0]


@dataclass(frozen=True)
class DecodeSchedule:
    """Per-tier work lists plus the slot map of the merge (see module docstring)."""

    num_rows: int
    num_tiers: int
    num_slots: int
    pages_per_split: int
    tiers: tuple[TierWork, ...]
    slot_ptr: torch.Tensor           # [num_rows, num_tiers + 1] int32


def _excl_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def entry_page_lens(indptr: torch.Tensor, last_page_len: torch.Tensor, page_size: int) -> torch.Tensor:
    """FlashInfer's convention: every entry is a full page except each row's last (``last_page_len``)."""
    indptr = indptr.to(torch.int64).cpu()
    counts = indptr[1:] - indptr[:-1]
    lens = torch.full((int(indptr[-1]),), page_size, dtype=torch.int64)
    has = counts > 0
    lens[indptr[1:][has] - 1] = last_page_len.to(torch.int64).cpu()[has]
    return lens.to(torch.int32)


def schedule_decode(indptr: torch.Tensor, page_tiers: torch.Tensor, indices: torch.Tensor,
                    page_lens: torch.Tensor, *, num_tiers: int, pages_per_split: int,
                    device=None) -> DecodeSchedule:
    """Build the :class:`DecodeSchedule` (host work; tensors end on ``device``).

    Parameters
    ----------
    indptr : ``[num_rows + 1]`` int — row offsets into the entry arrays.
    page_tiers : ``[nnz]`` int — tier index (``0 <= t < num_tiers``) of every entry.
    indices : ``[nnz]`` int — page id of every entry in its tier's arena.
    page_lens : ``[nnz]`` int — valid tokens of every entry.

    Examples
    --------
    >>> s = schedule_decode(torch.tensor([0, 3, 4]), torch.tensor([0, 1, 1, 1]), torch.tensor([5, 6, 7, 8]),
    ...                     torch.tensor([64, 64, 10, 3]), num_tiers=2, pages_per_split=1)
    >>> s.num_slots, s.slot_ptr.tolist()
    (4, [[0, 1, 3], [3, 3, 4]])
    """
    if pages_per_split < 1:
        raise ValueError(f"pages_per_split={pages_per_split!r} must be >= 1")
    indptr = indptr.to(torch.int64).cpu()
    tiers = page_tiers.to(torch.int64).cpu()
    indices = indices.to(torch.int64).cpu()
    page_lens = page_lens.to(torch.int64).cpu()
    num_rows = indptr.numel() - 1
    nnz = int(indptr[-1])
    if not (tiers.numel() == indices.numel() == page_lens.numel() == nnz):
        raise ValueError(f"indices/page_tiers/page_lens must have indptr[-1]={nnz} entries, got "
                         f"{indices.numel()}/{tiers.numel()}/{page_lens.numel()}")
    if nnz and (int(tiers.min()) < 0 or int(tiers.max()) >= num_tiers):
        raise ValueError(f"page_tiers must lie in [0, {num_tiers}), got [{int(tiers.min())}, {int(tiers.max())}]")
    counts = indptr[1:] - indptr[:-1]
    if bool((counts < 0).any()):
        raise ValueError("indptr must be non-decreasing")
    row_of = torch.repeat_interleave(torch.arange(num_rows), counts)
    key = tiers * num_rows + row_of
    order = torch.sort(key, stable=True).indices
    grp = torch.bincount(key, minlength=num_tiers * num_rows).view(num_tiers, num_rows)
    chunks = (grp + pages_per_split - 1) // pages_per_split                  # [T, R]
    slot_count = chunks.T.contiguous()                                        # [R, T]
    slot_ptr = torch.cat([torch.zeros(num_rows, 1, dtype=torch.int64), torch.cumsum(slot_count, 1)], 1)
    slot_ptr = slot_ptr + _excl_cumsum(slot_count.sum(1))[:, None]
    tier_work, tier_base = [], 0
    for t in range(num_tiers):
        n_t = int(grp[t].sum())
        ent = order[tier_base:tier_base + n_t]
        tier_base += n_t
        gstart = _excl_cumsum(grp[t])
        ch = chunks[t]
        w_rows = torch.repeat_interleave(torch.arange(num_rows), ch)
        cidx = torch.arange(w_rows.numel()) - torch.repeat_interleave(_excl_cumsum(ch), ch)
        w_start = gstart[w_rows] + cidx * pages_per_split
        w_end = torch.minimum(w_start + pages_per_split, gstart[w_rows] + grp[t][w_rows])
        w_slot = slot_ptr[w_rows, t] + cidx
        work = torch.stack([w_rows, w_start, w_end, w_slot], 1)
        work = work[torch.sort(w_end - w_start, descending=True, stable=True).indices]
        tier_work.append(TierWork(
            work=work.to(torch.int32).contiguous().to(device),
            page_ids=indices[ent].to(torch.int32).to(device),
            page_lens=page_lens[ent].to(torch.int32).to(device),
            entry_index=ent.to(device)))
    return DecodeSchedule(num_rows=num_rows, num_tiers=num_tiers, num_slots=int(slot_count.sum()),
                          pages_per_split=pages_per_split, tiers=tuple(tier_work),
                          slot_ptr=slot_ptr.to(torch.int32).contiguous().to(device))
