# SPDX-License-Identifier: Apache-2.0
"""Tier distortion calibration: measured on sample keys, values and queries, not assumed.

Distortion model (the units the allocator multiplies by utility). Storing key/value ``i`` at a
tier perturbs the attention output of query ``j``, to first order in its probability ``p_ji``, by
``p_ji·[(e^{δ_ji} - 1)(v̂_i - o_j) + (v̂_i - v_i)]`` where ``δ_ji`` is the scaled logit error
(minus its attention-weighted mean over the query's keys, since softmax ignores a common shift) and
``v̂_i`` the reconstructed value; dropping token ``i`` perturbs it by ``p_ji·(o_j - v_i)``. The
tier's distortion is the attention-weighted ratio of the two norms::

    D(t) = Σ_ji p_ji ‖(e^{δ_ji} - 1)(v̂_i - o_j) + (v̂_i - v_i)‖  /  Σ_ji p_ji ‖v_i - o_j‖

so ``D(drop) = 1`` and ``D(dense) = 0`` by definition; ``utility × D`` is then the expected output
perturbation of a token in units of "what dropping it would cost". The routine also reports each
tier's scaled-logit RMSE (nats) and the relative output error with every token at that tier.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..pages.arenas import roundtrip, tier_kind
from ..tiers import TierSet

__all__ = ["TierStats", "calibrate", "measure_tiers"]


@dataclass(frozen=True)
class TierStats:
    """Measured errors of one tier: ``distortion`` (drop = 1), ``logit_rmse`` (nats), ``output_rel_err``."""

    name: str
    distortion: float
    logit_rmse: float
    output_rel_err: float
    bytes_per_token: float


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 3:
        raise ValueError(f"{name} must be [..., H, N, d], got {tuple(x.shape)}")
    return x.to(torch.float32).reshape(-1, *x.shape[-3:])


def _measure_one(q, k, v, kh, vh, scale, q_pos):
    """Sums over one [H, ...] sample: (Σ p‖Δ‖, Σ p‖v-o‖, Σ δ², count, Σ‖ô-o‖/‖o‖, rows)."""
    hkv, n, d = k.shape
    hq, m, _ = q.shape
    g = hq // hkv
    qg = q.reshape(hkv, g * m, d)
    mask = torch.arange(n)[None, :] > q_pos.repeat(g)[:, None]                 # [G*M, N]
    l_true = (qg @ k.transpose(-1, -2)) * scale                              # [Hkv, R, N]
    l_hat = (qg @ kh.transpose(-1, -2)) * scale
    p = torch.softmax(l_true.masked_fill(mask, float("-inf")), -1)
    o = p @ v                                                                # [Hkv, R, d]
    delta = (l_hat - l_true).masked_fill(mask, 0.0)
    delta = delta - (p * delta).sum(-1, keepdim=True)                        # softmax ignores a per-query shift
    delta = delta.masked_fill(mask, 0.0)
    w = torch.expm1(delta)
    y = vh - v                                                               # [Hkv, N, d]
    oo = (o * o).sum(-1, keepdim=True)                                       # [Hkv, R, 1]
    xx = (vh * vh).sum(-1)[:, None, :] - 2 * (o @ vh.transpose(-1, -2)) + oo  # ‖v̂_i - o_j‖²
    xy = (vh * y).sum(-1)[:, None, :] - o @ y.transpose(-1, -2)              # (v̂_i - o_j)·y_i
    yy = (y * y).sum(-1)[:, None, :]
    pert = (w * w * xx + 2 * w * xy + yy).clamp_min(0).sqrt()
    ref = ((v * v).sum(-1)[:, None, :] - 2 * (o @ v.transpose(-1, -2)) + oo).clamp_min(0).sqrt()
    o_hat = torch.softmax(l_hat.masked_fill(mask, float("-inf")), -1) @ vh
    rel = (o_hat - o).norm(dim=-1) / o.norm(dim=-1).clamp_min(1e-12)
    visible = (~mask).sum() * hkv
    return (float((p * pert).sum()), float((p * ref).sum()), float((delta * delta).sum()), int(visible),
            float(rel.sum()), rel.numel())


def measure_tiers(tierset: TierSet, sample_k: torch.Tensor, sample_v: torch.Tensor, sample_q: torch.Tensor, *,
                  sm_scale: float | None = None, q_positions: torch.Tensor | None = None) -> list[TierStats]:
    """Measure every tier of ``tierset`` on samples.

    Parameters
    ----------
    sample_k, sample_v : ``[..., Hkv, N, d]`` float — real keys (post-RoPE) and values, consecutive tokens.
    sample_q : ``[..., Hq, M, d]`` float — queries with the same leading dims (e.g. an observation window).
    q_positions : ``[M]`` int64 positions of the queries among the ``N`` keys (causal); default ``N-M .. N-1``.
    """
    k, v, q = _flat(sample_k, "sample_k"), _flat(sample_v, "sample_v"), _flat(sample_q, "sample_q")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible sample shapes k {tuple(sample_k.shape)}, v {tuple(sample_v.shape)}, "
                         f"q {tuple(sample_q.shape)}")
    n, d = k.shape[-2], k.shape[-1]
    m = q.shape[-2]
    scale = sm_scale if sm_scale is not None else d ** -0.5
    q_pos = (q_positions if q_positions is not None else torch.arange(n - m, n)).to(torch.int64)
    stats = []
    for tier in tierset.tiers:
        bpt = tier.bytes_per_token(tierset.head_dim, tierset.page_size)
        if tier_kind(tier) == "dense":
            stats.append(TierStats(tier.name, 0.0, 0.0, 0.0, bpt))
            continue
        kh, vh = roundtrip(tier, k, v, page_size=tierset.page_size)
        acc = [0.0] * 6
        for b in range(k.shape[0]):
            for i, x in enumerate(_measure_one(q[b], k[b], v[b], kh[b], vh[b], scale, q_pos)):
                acc[i] += x
        stats.append(TierStats(tier.name, acc[0] / max(acc[1], 1e-30), (acc[2] / max(acc[3], 1)) ** 0.5,
                               acc[4] / max(acc[5], 1), bpt))
    return stats


def calibrate(tierset: TierSet, sample_k: torch.Tensor, sample_v: torch.Tensor, sample_q: torch.Tensor, *,
              sm_scale: float | None = None, q_positions: torch.Tensor | None = None, monotone: bool = True,
              return_stats: bool = False):
    """Return ``tierset`` with ``distortion`` filled by :func:`measure_tiers` (dense 0, drop = 1 implicit).

    With ``monotone`` a running maximum keeps the distortion nondecreasing along the tiers (the
    allocator needs it; measurement noise between close tiers could otherwise invert them); the
    raw values stay in the returned stats.

    Examples
    --------
    >>> ts = calibrate(TierSet.default(page_size=16), torch.randn(2, 64, 64), torch.randn(2, 64, 64),
    ...                torch.randn(6, 8, 64))
    >>> ts.distortion[0] == 0.0 and ts.distortion[1] < ts.distortion[2] < 1.0
    True
    """
    stats = measure_tiers(tierset, sample_k, sample_v, sample_q, sm_scale=sm_scale, q_positions=q_positions)
    dist, run = [], 0.0
    for s in stats:
        run = max(run, s.distortion) if monotone else s.distortion
        dist.append(run)
    out = replace(tierset, distortion=tuple(dist))
    return (out, stats) if return_stats else out
