# SPDX-License-Identifier: Apache-2.0
"""Checks on incoming tensors: NaN/Inf handling with a defined, named behaviour."""
from __future__ import annotations

import torch

__all__ = ["NonFiniteError", "check_finite"]


class NonFiniteError(ValueError):
    """Raised when keys or values contain NaN/Inf and the config says ``nonfinite="raise"``."""


def check_finite(x: torch.Tensor, name: str, policy: str) -> tuple[torch.Tensor, int]:
    """Return ``(x', count)``: ``x`` unchanged if finite; else raise (``"raise"``) or zero the bad tokens (``"zero"``).

    A token (last-dim row) with any NaN/Inf is zeroed whole, so it carries no attention
    weight beyond a zero key; ``count`` is the number of such rows.
    """
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return x, 0
    rows = bad.any(-1)
    count = int(rows.sum())
    if policy == "raise":
        first = tuple(int(i) for i in rows.nonzero()[0].tolist())
        raise NonFiniteError(f"{name} contains NaN/Inf in {count} token row(s); first at index {first}")
    return torch.where(rows[..., None], torch.zeros_like(x), x), count
