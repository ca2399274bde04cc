# SPDX-License-Identifier: Apache-2.0
"""Greedy fix-up of a page-rounded allocation on the exact packed bytes.

State of one (layer, kv head) ``g``: boundaries ``a[g] = [0, a_1, ..., a_T]`` over its tokens
sorted by utility (descending): tier ``t`` holds sorted ranks ``a_t .. a_{t+1}-1``, ranks from
``a_T`` on are dropped, and ``a_1 ≥ n_prot[g]`` (protected tokens sit at tier 0). Exact bytes are
``Σ_t ceil((a_{t+1}-a_t)/P)·page_bytes[t]``; distortion is ``Σ_t D_t·(utility mass of tier t)
+ D_drop·(dropped mass)``, read from suffix sums ``s[g, r] = Σ_{j≥r} u_j``.

Moves per head (``2T+1``): promote into tier ``t`` (fill its partial page, or one more page; the
tokens come from the tiers below / the dropped set), demote out of tier ``t`` (its partial page,
or one page, to tier ``t+1`` — to drop for the last tier), and drop the least useful kept tokens
(the partial page, or one page, of the last non-empty tier). The loop first shrinks below the
budget (least distortion added per byte saved), then grows while a helpful move fits (free
moves first, then most distortion removed per byte).
"""
from __future__ import annotations

import math

import torch

__all__ = ["fixup"]


def _row_moves(a: list[int], n: int, n_prot: int, page: int, allow_drop: bool = True) -> list[list[int]]:
    t = len(a) - 1
    c = [a[i + 1] - a[i] for i in range(t)]
    out = []
    for i in range(t):                                        # promote into tier i
        rem = c[i] % page
        end = min(a[i + 1] + (page - rem if rem else page), n)
        b = a[:]
        b[i + 1] = end
        for j in range(i + 2, t + 1):
            b[j] = max(b[j], end)
        out.append(b)
    for i in range(t):                                        # demote out of tier i
        rem = c[i] % page
        lower = max(a[i], n_prot) if i == 0 else a[i]
        b = a[:]
        b[i + 1] = max(a[i + 1] - (rem if rem else page), lower)
        out.append(b if allow_drop or i < t - 1 else a[:])   # out of the last tier is a drop
    if not allow_drop:
        out.append(a[:])                                      # no-op in place of the drop move
        return out
    last = max((i for i in range(t) if c[i] > 0), default=0)  # drop from the least precise kept tier
    rem = c[last] % page
    end = max(a[t] - (rem if rem else page), n_prot)
    out.append([min(x, end) for x in a])
    return out


class _Costs:
    def __init__(self, s: torch.Tensor, page_bytes: list[int], dist: list[float], page: int):
        self.s, self.pb, self.dist, self.page = s, page_bytes, dist, page

    def __call__(self, g: int, cands: list[list[int]]) -> tuple[list[int], list[float]]:
        idx = sorted({x for b in cands for x in b})
        sv = dict(zip(idx, self.s[g, torch.tensor(idx)].tolist()))
        t, p = len(self.pb), self.page
        dg = self.dist[g] if isinstance(self.dist[0], (list, tuple)) else self.dist
        nbytes, dist = [], []
        for b in cands:
            nbytes.append(sum(-(-(b[i + 1] - b[i]) // p) * self.pb[i] for i in range(t)))
            dist.append(sum(dg[i] * (sv[b[i]] - sv[b[i + 1]]) for i in range(t)) + dg[t] * sv[b[t]])
        return nbytes, dist


def fixup(a: torch.Tensor, s: torch.Tensor, n_prot: torch.Tensor, page_bytes: list[int], dist: list[float],
          page: int, budget: int, allow_drop: bool = True) -> torch.Tensor:
    """Return boundaries ``[G, T+1]`` int64 with exact bytes ``≤ budget`` after the greedy moves.

    Parameters
    ----------
    a : ``[G, T+1]`` int64 start boundaries (``a[:, 0] = 0``, nondecreasing, ``a[:, 1] ≥ n_prot``).
    s : ``[G, N+1]`` float64 suffix sums of the sorted utilities (protected counted as 0).
    dist : ``T + 1`` distortions, the last one for drop; or one such list per row ``g`` (per-layer distortion).
    allow_drop : with ``False`` no move drops a token (the floor; the start must drop nothing).
    """
    g_count, t1 = a.shape
    n = s.shape[1] - 1
    m = 2 * (t1 - 1) + 1
    rows = a.tolist()
    prot = n_prot.tolist()
    cost = _Costs(s, page_bytes, dist, page)
    cur = [cost(g, [rows[g]]) for g in range(g_count)]
    cur_b = [c[0][0] for c in cur]
    cur_d = [c[1][0] for c in cur]
    total = sum(cur_b)
    cands: list[list[list[int]]] = []
    db = torch.empty(g_count, m, dtype=torch.float64)
    dd = torch.empty(g_count, m, dtype=torch.float64)

    def refresh(g: int) -> None:
        cand = _row_moves(rows[g], n, prot[g], page, allow_drop)
        nb, nd = cost(g, cand)
        if g < len(cands):
            cands[g] = cand
        else:
            cands.append(cand)
        db[g] = torch.tensor([x - cur_b[g] for x in nb], dtype=torch.float64)
        dd[g] = torch.tensor([x - cur_d[g] for x in nd], dtype=torch.float64)

    for g in range(g_count):
        refresh(g)
    grow = torch.zeros(m, dtype=torch.bool)
    grow[: t1 - 1] = True
    while True:
        if total > budget:
            ok = db < 0
            score = torch.where(ok, dd / (-db).clamp_min(1), torch.full_like(dd, math.inf))
            flat = int(score.argmin())
            if not bool(ok.view(-1)[flat]):
                raise RuntimeError("allocation cannot shrink below the budget (internal error)")
        else:
            ok = (dd < 0) & (db <= budget - total) & grow
            if not bool(ok.any()):
                break
            free = ok & (db <= 0)
            pick, score = (free, -dd) if bool(free.any()) else (ok, -dd / db.clamp_min(1))
            flat = int(torch.where(pick, score, torch.full_like(score, -math.inf)).argmax())
        g, j = divmod(flat, m)
        rows[g] = cands[g][j]
        total += int(db[g, j])
        cur_b[g] += int(db[g, j])
        cur_d[g] += float(dd[g, j])
        refresh(g)
    return torch.tensor(rows, dtype=torch.int64)
