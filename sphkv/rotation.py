# SPDX-License-Identifier: Apache-2.0
"""Seeded randomized Hadamard rotation, applied to keys and queries alike (and optionally values)."""
from __future__ import annotations

import functools

import torch

__all__ = ["rotation_matrix"]


@functools.lru_cache(maxsize=32)
def _rotation_cpu(head_dim: int, seed: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < head_dim:                       # Sylvester construction
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (head_dim,), generator=g, dtype=torch.int64) * 2 - 1
    perm = torch.randperm(head_dim, generator=g)
    r = (h[perm] * signs.to(torch.float64)[None, :]) / head_dim ** 0.5
    return r.to(torch.float32)


def rotation_matrix(head_dim: int, seed: int, *, device=None) -> torch.Tensor:
    """Orthogonal ``R`` of shape ``[head_dim, head_dim]`` float32; rotate row vectors with ``x @ R.T``.

    ``R = P · H · diag(s) / sqrt(d)`` with a seeded sign vector ``s`` and row permutation ``P``.
    The same ``(head_dim, seed)`` gives the same matrix on every process and device.
    """
    return _rotation_cpu(head_dim, seed).to(device)
