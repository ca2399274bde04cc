# SPDX-License-Identifier: Apache-2.0
"""Work items of the CPU kernels for one batch, with shared page runs read once (cascade).

The CPU kernels (:mod:`sphkv_kernels.cpu_decode`, ``mode`` merge) take items
``(first query row, query rows, kv head, entry start, entry end, 0)`` over per-tier entry arrays
(``page_ids`` / ``page_lens``) and merge each item's attention state into the rows it covers.
:func:`cpu_items` builds them from a FlashInfer-style plan (``qo_indptr``, ``kv_indptr`` over rows
``b * num_kv_heads + h``, page ``indices``, ``page_tiers``, ``page_lens``).

Cascade (FlashInfer's idea, on the CPU kernels): consecutive requests whose page lists start with the
same pages (same tier, page id and length on every kv head — the radix cache hands every request of a
shared prefix the same pages) form a group; the group's common leading pages become one item per kv
head whose rows are all the members' queries (decode: ``members x GQA group`` rows, a real matrix
product; extend: all their new tokens), so each shared page is expanded once per batch instead of once
per request. Each member keeps an item over its own remaining pages. Within one pass the items of a tier
cover disjoint rows (the kernels may run items in parallel), so a tier with groups runs in two passes:
the groups' items, then the members' own items; the merge is order-independent up to rounding.
"""
from __future__ import annotations

import torch

__all__ = ["cpu_items", "shared_groups"]


def shared_groups(qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, indices: torch.Tensor, page_tiers: torch.Tensor,
                  page_lens: torch.Tensor, num_kv_heads: int) -> list[tuple[int, int, int]]:
    """Runs of consecutive requests that share leading pages: ``[(first request, last request, shared entries)]``
    (2 or more members, ``shared >= 1``; requests without queries never join). Host tensors."""
    H = num_kv_heads
    rows = kv_indptr.numel() - 1
    B = rows // H
    if B < 2:
        return []
    counts = kv_indptr[1:] - kv_indptr[:-1]                                       # [rows]
    maxp = int(counts.max()) if rows else 0
    if maxp == 0:
        return []
    col = torch.arange(maxp)
    valid = col[None, :] < counts[:, None]                                         # [rows, maxp]
    pos = (kv_indptr[:-1, None] + col[None, :]).clamp(max=max(indices.numel() - 1, 0))
    # one int64 key per entry: (tier, page id, length) — equal keys on every head = the same keys and values
    key = (page_tiers.to(torch.int64)[pos] << 48) | (indices.to(torch.int64)[pos] << 16) | page_lens.to(torch.int64)[pos]
    key = torch.where(valid, key, torch.full_like(key, -1)).view(B, H, maxp)
    same = ((key[1:] == key[:-1]) & (key[1:] >= 0)).all(1)                          # [B-1, maxp]
    common = torch.cumprod(same.to(torch.int64), 1).sum(1)                          # leading shared entries
    has_q = (qo_indptr[1:] - qo_indptr[:-1]) > 0
    common = torch.where(has_q[1:] & has_q[:-1], common, torch.zeros_like(common)).tolist()
    groups, b0, s = [], 0, 0
    for b in range(1, B):
        c = common[b - 1]
        if c >= 1:
            s = c if b - 1 == b0 else min(s, c)
            continue
        if b - 1 > b0:
            groups.append((b0, b - 1, s))
        b0, s = b, 0
    if B - 1 > b0:
        groups.append((b0, B - 1, s))
    return groups


def cpu_items(qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, indices: torch.Tensor, page_tiers: torch.Tensor,
              page_lens: torch.Tensor, *, num_kv_heads: int, num_tiers: int, cascade: bool = True) -> list:
    """Per tier, a list of passes ``(items [W, 6] int64, page_ids [n] int32, page_lens [n] int32)`` (empty list:
    no entry of that tier). Without groups (or ``cascade=False``) one pass per tier, one item per (request, kv head)
    with queries and entries there. Host (CPU) tensors."""
    H = num_kv_heads
    qo = qo_indptr.to("cpu", torch.int64)
    kv = kv_indptr.to("cpu", torch.int64)
    tiers = page_tiers.to("cpu", torch.int64)
    ids = indices.to("cpu", torch.int32)
    lens = page_lens.to("cpu", torch.int32)
    rows = kv.numel() - 1
    groups = shared_groups(qo, kv, ids, tiers, lens, H) if cascade else []
    counts = kv[1:] - kv[:-1]
    row_of = torch.repeat_interleave(torch.arange(rows), counts)                   # [nnz]
    j_of = torch.arange(row_of.numel()) - kv[:-1][row_of]                           # position in its row
    b_of_row = torch.arange(rows) // H
    q_start, q_len = qo[:-1][b_of_row], (qo[1:] - qo[:-1])[b_of_row]
    # virtual rows: 0..rows-1 own entries, rows + g * H + h the shared entries of group g (first member's copy)
    vrow = row_of.clone()
    skip = torch.zeros(rows // H if H else 0, dtype=torch.int64)
    first = torch.full_like(skip, -1)
    g_start, g_len = [], []
    for g, (b0, b1, s) in enumerate(groups):
        skip[b0:b1 + 1] = s
        first[b0:b1 + 1] = g
        g_start.append(int(qo[b0]))
        g_len.append(int(qo[b1 + 1] - qo[b0]))
    if groups:
        eb = row_of // H
        shared = j_of < skip[eb]
        lead = torch.tensor([b0 for b0, _, _ in groups])[first[eb].clamp(min=0)] == eb
        vrow = torch.where(shared & lead, rows + first[eb] * H + row_of % H, vrow)
        vrow = torch.where(shared & ~lead, torch.full_like(vrow, -1), vrow)         # read once, by the group item
    nv = rows + len(groups) * H
    v_start = torch.cat([q_start, torch.tensor(g_start, dtype=torch.int64).repeat_interleave(H)])
    v_len = torch.cat([q_len, torch.tensor(g_len, dtype=torch.int64).repeat_interleave(H)])
    v_head = torch.arange(nv) % H
    keep_e = vrow >= 0
    key = tiers[keep_e] * nv + vrow[keep_e]
    ent_all = torch.nonzero(keep_e).flatten()
    order = ent_all[torch.sort(key, stable=True).indices]
    grp = torch.bincount(key, minlength=num_tiers * nv).view(num_tiers, nv)
    per_tier = grp.sum(1).tolist()
    out, base = [], 0
    for t in range(num_tiers):
        n_t = per_tier[t]
        ent = order[base:base + n_t]
        base += n_t
        if n_t == 0:
            out.append([])
            continue
        start = torch.cumsum(grp[t], 0) - grp[t]
        keep = (grp[t] > 0) & (v_len > 0)
        it = torch.stack([v_start, v_len, v_head, start, start + grp[t], torch.zeros_like(start)], 1)
        tid, tlen = ids[ent].contiguous(), lens[ent].contiguous()
        passes = []
        for sel in (keep & (torch.arange(nv) >= rows), keep & (torch.arange(nv) < rows)):   # groups first, then own
            if bool(sel.any()):
                passes.append((it[sel].contiguous(), tid, tlen))
        out.append(passes)
    return out
