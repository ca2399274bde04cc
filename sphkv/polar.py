# SPDX-License-Identifier: Apache-2.0
"""Recursive polar transform: ``d`` coordinates ↔ one radius and ``d - 1`` angles.

Level 1 pairs coordinates ``(x[2i], x[2i+1])`` → radius ``ρ_i`` and angle ``θ_i ∈ [0, 2π)``.
Level ``l ≥ 2`` pairs radii ``(ρ[2j], ρ[2j+1])`` of level ``l-1`` → radius and angle ``ψ_j ∈ [0, π/2]``.
After ``log2(d)`` levels one radius ``r = ||x||`` is left.
"""
from __future__ import annotations

import math

import torch

__all__ = ["polar_forward", "polar_inverse", "level_sizes", "node_radii"]


def level_sizes(head_dim: int) -> list[int]:
    """Number of angles per level: ``[d/2, d/4, ..., 1]``."""
    return [head_dim >> l for l in range(1, int(math.log2(head_dim)) + 1)]


def polar_forward(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``x`` ``[..., d]`` float → (radius ``[...]``, angles per level ``[[..., d/2], [..., d/4], ...]``)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    angles = [torch.remainder(torch.atan2(odd, even), 2 * math.pi)]
    rho = torch.sqrt(even * even + odd * odd)
    while rho.shape[-1] > 1:
        a, b = rho[..., 0::2], rho[..., 1::2]
        angles.append(torch.atan2(b, a))
        rho = torch.sqrt(a * a + b * b)
    return rho[..., 0], angles


def polar_inverse(radius: torch.Tensor, angles: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`polar_forward`: radius ``[...]`` and angles → ``[..., d]``."""
    rho = radius[..., None]
    for psi in reversed(angles[1:]):
        rho = torch.stack([rho * torch.cos(psi), rho * torch.sin(psi)], -1).flatten(-2)
    theta = angles[0]
    return torch.stack([rho * torch.cos(theta), rho * torch.sin(theta)], -1).flatten(-2)


def node_radii(x: torch.Tensor) -> list[torch.Tensor]:
    """Radius of the node each angle belongs to, per level (same shapes as the angles of :func:`polar_forward`)."""
    rho = torch.sqrt(x[..., 0::2] ** 2 + x[..., 1::2] ** 2)
    out = [rho]
    while rho.shape[-1] > 1:
        rho = torch.sqrt(rho[..., 0::2] ** 2 + rho[..., 1::2] ** 2)
        out.append(rho)
    return out
