# SPDX-License-Identifier: Apache-2.0
"""Angle codebooks for the recursive polar transform.

Level 1 angles (one per coordinate pair) are uniform on ``[0, 2π)`` after a random rotation:
their codebook is the uniform grid. A level-``l`` angle (``l >= 2``) lies in ``[0, π/2]`` with
density ``∝ sin(2ψ)^(2^(l-1) - 1)`` for an isotropic key; its codebook is Lloyd-Max on that
density (``codebook="analytic"``), the uniform grid (``"uniform"``), or fitted to sample angles
(:func:`fit_codebook`). Each level contributes about ``||k||² · E[δψ²]`` to the key's squared
error, so :func:`optimal_level_bits` spends bits where they buy the most error per bit.
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["level_codebook", "angle_density", "lloyd_max", "fit_codebook", "optimal_level_bits",
           "codebook_mse", "thresholds"]

_GRID = 8192


def angle_density(level: int, grid: torch.Tensor) -> torch.Tensor:
    """Unnormalized density of a level-``level`` angle on ``grid`` (radians, float64)."""
    if level == 1:
        return torch.ones_like(grid)
    return torch.sin(2 * grid).clamp_min(0) ** (2 ** (level - 1) - 1)


def _level_range(level: int) -> float:
    return 2 * math.pi if level == 1 else math.pi / 2


def lloyd_max(x: torch.Tensor, w: torch.Tensor, bits: int, lo: float, hi: float, *, iters: int = 200) -> torch.Tensor:
    """Weighted Lloyd-Max on samples ``x`` [N] with weights ``w`` [N]; returns sorted centers [2**bits] float64."""
    n = 1 << bits
    c = lo + (torch.arange(n, dtype=torch.float64) + 0.5) * (hi - lo) / n
    for _ in range(iters):
        idx = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
        num = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, w * x)
        den = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, w)
        new = torch.where(den > 0, num / den.clamp_min(1e-300), c)
        if torch.allclose(new, c, atol=1e-12):
            break
        c = new
    return c


@functools.lru_cache(maxsize=256)
def _analytic(level: int, bits: int, kind: str) -> torch.Tensor:
    hi = _level_range(level)
    n = 1 << bits
    if level == 1 or kind == "uniform":
        return (torch.arange(n, dtype=torch.float64) + 0.5) * hi / n
    grid = (torch.arange(_GRID, dtype=torch.float64) + 0.5) * hi / _GRID
    return lloyd_max(grid, angle_density(level, grid), bits, 0.0, hi)


def level_codebook(level: int, bits: int, kind: str = "analytic") -> torch.Tensor:
    """Sorted angle centers ``[2**bits]`` float64 for polar level ``level`` (1-based)."""
    return _analytic(level, bits, kind).clone()


def thresholds(centers: torch.Tensor) -> torch.Tensor:
    """Decision boundaries ``[n-1]`` between sorted centers."""
    return (centers[1:] + centers[:-1]) / 2


def fit_codebook(angles: torch.Tensor, level: int, bits: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Lloyd-Max fitted to observed level-``level`` angles (radians, any shape).

    ``weights`` (same shape) should be the squared radius of each angle's node: a key's squared
    error from an angle error ``δψ`` is ``ρ_node² δψ²``, so weighting by ``ρ²`` fits key MSE.
    Level 1 is circular; its fit starts from the uniform grid and ignores wrap-around between
    the first and last cell (both stay near the ends of ``[0, 2π)``).
    """
    x = angles.detach().to(torch.float64).flatten().cpu()
    w = torch.ones_like(x) if weights is None else weights.detach().to(torch.float64).flatten().cpu()
    return lloyd_max(x, w, bits, 0.0, _level_range(level))


@functools.lru_cache(maxsize=512)
def codebook_mse(level: int, bits: int, kind: str = "analytic") -> float:
    """Expected squared angle error E[δψ²] of a level's codebook under the isotropic density."""
    hi = _level_range(level)
    grid = (torch.arange(_GRID, dtype=torch.float64) + 0.5) * hi / _GRID
    w = angle_density(level, grid)
    w = w / w.sum()
    c = _analytic(level, bits, kind)
    q = c[torch.bucketize(grid, thresholds(c))]
    err = grid - q
    if level == 1:                                            # wrap-around on the circle
        err = torch.remainder(err + math.pi, 2 * math.pi) - math.pi
    return float((w * err * err).sum())


@functools.lru_cache(maxsize=64)
def optimal_level_bits(head_dim: int, bits_per_coord: float, kind: str = "analytic") -> tuple[int, ...]:
    """Greedy marginal-return allocation of ``bits_per_coord * head_dim`` angle bits over the levels.

    Minimizes ``Σ_l codebook_mse(l, b_l)`` (each level weighs ``||k||²`` once) subject to
    ``Σ_l (head_dim / 2**l) · b_l ≤ budget``, with ``1 ≤ b_l ≤ 8``.
    """
    levels = int(math.log2(head_dim))
    count = [head_dim >> l for l in range(1, levels + 1)]
    bits = [1] * levels
    budget = bits_per_coord * head_dim - sum(count)
    while True:
        best, best_gain = None, 0.0
        for l in range(levels):
            if bits[l] >= 8 or count[l] > budget:
                continue
            gain = (codebook_mse(l + 1, bits[l], kind) - codebook_mse(l + 1, bits[l] + 1, kind)) / count[l]
            if gain > best_gain:
                best, best_gain = l, gain
        if best is None:
            return tuple(bits)
        bits[best] += 1
        budget -= count[best]
