# SPDX-License-Identifier: Apache-2.0
"""Eviction baselines at a byte budget: a fraction ``f`` of the bf16 prefix's bytes.

Kept tokens stay dense bf16, in pages of ``page_size`` per (layer, kv head) with
:data:`sphkv.tiers.PAGE_META_BYTES` per page (their positions are not contiguous), so the number kept
per head is the largest ``k`` whose bytes fit ``f × N × d × 2 × 2``. Scores come from the
observation window: the post-RoPE queries of the context's last ``W`` tokens (query-agnostic — the
question comes after compression), summed over the group's query heads.

* ``streamingllm@f`` — 4 attention sinks + the most recent tokens.
* ``snapkv@f`` — the window itself + the top tokens by window attention, average-pooled (kernel 7).
* ``pyramidkv@f`` — SnapKV scores with budgets decreasing linearly over layers (β = 20), same total.
* ``h2o@f`` — half heavy hitters by accumulated window attention (unpooled), half most recent tokens.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sphkv.tiers import PAGE_META_BYTES
from sphkv_hf.segments import DenseSegment

from .methods import CompressedPrefix, PrefillContext, max_tokens_for_bytes, register

__all__ = ["window_attention", "Eviction", "POLICIES"]

PAGE = 64
SINKS = 4


def window_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention mass per key from the window queries.

    q : ``[1, Hq, W, d]`` float32 — queries of the last ``W`` context tokens; k : ``[1, Hkv, N, d]``.
    Returns ``[1, Hkv, N]`` float32: softmax probabilities (causal inside the window) summed over the
    ``W`` queries and the group's query heads.
    """
    b, hq, w, d = q.shape
    hkv, n = k.shape[1], k.shape[-2]
    qg = q.reshape(b, hkv, (hq // hkv) * w, d)
    s = (qg @ k.float().transpose(-1, -2)) * d ** -0.5                      # [1, Hkv, G*W, N]
    qpos = (n - w + torch.arange(w)).repeat(hq // hkv)
    s = s.masked_fill(torch.arange(n)[None, :] > qpos[:, None], float("-inf"))
    return torch.softmax(s, -1).sum(-2)


def _topk_with(forced: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[1, Hkv, k]`` (sorted): all ``forced`` (bool ``[N]``) plus the best-scoring others."""
    s = scores.masked_fill(forced, float("inf"))
    return s.topk(k, -1).indices.sort(-1).values


def _streaming(scores_fn, ctx, layer, k):
    n = ctx.num_tokens
    forced = torch.zeros(n, dtype=torch.bool)
    forced[:min(SINKS, k)] = True
    forced[n - (k - min(SINKS, k)):] = True
    return _topk_with(forced, torch.zeros(1, ctx.num_kv_heads, n), k)


def _snap(scores_fn, ctx, layer, k):
    n, w = ctx.num_tokens, min(ctx.queries[layer].shape[-2], k)
    sc = F.avg_pool1d(scores_fn(layer), kernel_size=7, padding=3, stride=1, count_include_pad=False)
    forced = torch.zeros(n, dtype=torch.bool)
    forced[n - w:] = True
    return _topk_with(forced, sc, k)


def _h2o(scores_fn, ctx, layer, k):
    n = ctx.num_tokens
    forced = torch.zeros(n, dtype=torch.bool)
    forced[n - k // 2:] = True
    return _topk_with(forced, scores_fn(layer), k)


POLICIES = {"streamingllm": _streaming, "snapkv": _snap, "pyramidkv": _snap, "h2o": _h2o}


def pyramid_budgets(k: int, layers: int, window: int, n: int, beta: int = 20) -> list[int]:
    """PyramidKV: per-layer token budgets, linear from ``2(k-W) - min`` down to ``min = (k-W)/β`` (+ W)."""
    c = max(0, k - window)
    lo = c // beta
    hi = 2 * c - lo
    steps = [round(hi - (hi - lo) * l / max(1, layers - 1)) for l in range(layers)]
    return [min(n, s + window) for s in steps]


@dataclass(frozen=True)
class Eviction:
    policy: str
    fraction: float
    name: str = "eviction"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} is not supported; allowed: {sorted(POLICIES)}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction!r} must be in (0, 1]")

    @property
    def budget_fraction(self) -> float:
        return self.fraction

    def build(self, ctx: PrefillContext) -> CompressedPrefix:
        n, d, layers = ctx.num_tokens, ctx.head_dim, ctx.num_layers
        per_tok = d * 2 * 2
        k = max_tokens_for_bytes(self.fraction * n * per_tok, per_tok, page_size=PAGE,
                                 page_meta=PAGE_META_BYTES, num_tokens=n)
        budgets = [k] * layers
        if self.policy == "pyramidkv":
            budgets = pyramid_budgets(k, layers, ctx.queries[0].shape[-2], n)
        scores = functools.lru_cache(maxsize=None)(lambda l: window_attention(ctx.queries[l], ctx.keys[l]))
        segs = []
        for l, (kk, vv) in enumerate(zip(ctx.keys, ctx.values)):
            idx = POLICIES[self.policy](scores, ctx, l, budgets[l])[..., None].expand(-1, -1, -1, d)
            segs.append([DenseSegment.build(kk.gather(2, idx), vv.gather(2, idx), page_size=PAGE,
                                            positions=idx[..., 0])])
        return CompressedPrefix.of(segs, ctx)


for _f in (0.10, 0.25):
    for _p in POLICIES:
        register(f"{_p}@{_f:.2f}", functools.partial(Eviction, _p, _f, name=f"{_p}@{_f:.2f}"),
                 quick=_f == 0.10, group=_p)
