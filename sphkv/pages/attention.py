# SPDX-License-Identifier: Apache-2.0
"""Reference decode attention over tier-homogeneous pages (pure PyTorch).

For each kv head the pages are read tier by tier, one code path per tier kind (dense: plain
matmul; ADA: logits from angle codes + dequantized values; grid: dequantize + matmul), and the
partial softmax states (:func:`sphkv.attention.attention_state`) are merged exactly by log-sum-exp
(:func:`sphkv.attention.merge_state`), together with an optional dense tail of recent tokens (causal, as
in :func:`sphkv.attention.attention_from_codes`). Stored tokens all precede the queries.
"""
from __future__ import annotations

from functools import reduce

import torch

from ..attention import attention_state, causal_tail_hidden, merge_state
from .arenas import kind_of
from .store import PagedStore

__all__ = ["paged_attention"]


def _state(scores: torch.Tensor, values: torch.Tensor, unrotate) -> tuple[torch.Tensor, torch.Tensor]:
    """State ``(o [R, d], lse [R])`` of ``scores`` ``[R, T]`` over ``values`` ``[T, d]`` (``unrotate`` is linear)."""
    o, lse = attention_state(scores, values)
    return unrotate(o), lse


def _tail_scores(qg: torch.Tensor, tail_k: torch.Tensor, m: int, g: int, scale: float, causal: bool) -> torch.Tensor:
    s = (qg @ tail_k.to(torch.float32).T) * scale                             # [G*M, T]
    if causal:
        s = s.masked_fill(causal_tail_hidden(tail_k.shape[0], m, g, qg.device), float("-inf"))
    return s


def paged_attention(
    q: torch.Tensor,
    store: PagedStore,
    layer: int,
    *,
    tail_k: torch.Tensor | None = None,
    tail_v: torch.Tensor | None = None,
    sm_scale: float | None = None,
    causal: bool = True,
    return_key_mass: bool = False,
    num_positions: int | None = None,
):
    """Attention of ``q`` over the pages of ``layer`` followed by an optional dense tail.

    Parameters
    ----------
    q : ``[Hq, M, d]`` or ``[1, Hq, M, d]`` float — query head ``h`` reads kv head ``h // (Hq / Hkv)``.
    store : the paged store; every kv head of ``layer`` must hold at least one token (or a tail).
    tail_k, tail_v : ``[Hkv, T, d]`` (or ``[1, Hkv, T, d]``) — tokens after the stored ones; with
        ``causal`` the ``M`` queries are the last ``M`` tail tokens.
    return_key_mass : also return ``[Hkv, num_positions]`` float32 — attention probability of each
        stored token (scattered to its original position), summed over the group's query heads and
        the ``M`` queries — and the tail's ``[Hkv, T]``.

    Returns
    -------
    ``out`` with the shape of ``q`` (float32); with ``return_key_mass``: ``(out, mass, tail_mass)``.
    """
    squeeze = q.dim() == 4
    if squeeze:
        q = q[0]
        tail_k = tail_k[0] if tail_k is not None and tail_k.dim() == 4 else tail_k
        tail_v = tail_v[0] if tail_v is not None and tail_v.dim() == 4 else tail_v
    hq, m, d = q.shape
    hkv = store.num_kv_heads
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    g = hq // hkv
    scale = sm_scale if sm_scale is not None else d ** -0.5
    qg = q.to(torch.float32).reshape(hkv, g * m, d)
    outs, masses, tail_masses = [], [], []
    for h in range(hkv):
        blocks, positions = [], []
        for t, tier in enumerate(store.tierset.tiers):
            metas = [x for x in store.pages(layer, h) if x.tier == t]
            if not metas:
                continue
            pages = torch.tensor([x.page for x in metas])
            lens = torch.tensor([x.count for x in metas])
            blocks.append(kind_of(tier).block(store.arenas[t], pages, lens, qg[h], scale))
            positions.append(torch.cat([x.positions.to(torch.int64) for x in metas]))
        states = [_state(b.scores, b.values, b.unrotate) for b in blocks]
        if tail_k is not None and tail_k.shape[-2] > 0:
            ts = _tail_scores(qg[h], tail_k[h], m, g, scale, causal)
            states.append(_state(ts, tail_v[h].to(torch.float32), lambda x: x))
        if not states:
            raise ValueError(f"layer {layer} kv head {h} has no stored tokens and no tail")
        out, lse = reduce(lambda a, b: merge_state(*a, *b), states)
        outs.append(out)
        if return_key_mass:
            n_pos = num_positions or 1 + max([int(p.max()) for p in positions] + [0])
            mass = torch.zeros(n_pos)
            for b, pos in zip(blocks, positions):
                mass.index_add_(0, pos, torch.exp(b.scores - lse[:, None]).sum(0))
            masses.append(mass)
            if tail_k is not None and tail_k.shape[-2] > 0:
                tail_masses.append(torch.exp(ts - lse[:, None]).sum(0))
    out = torch.stack(outs).reshape(hq, m, d)
    out = out[None] if squeeze else out
    if not return_key_mass:
        return out
    tail = torch.stack(tail_masses) if tail_masses else torch.zeros(hkv, 0)
    n_pos = max(x.numel() for x in masses)
    return out, torch.stack([torch.nn.functional.pad(x, (0, n_pos - x.numel())) for x in masses]), tail
