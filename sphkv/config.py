# SPDX-License-Identifier: Apache-2.0
"""Configuration of the Spherical KV codec: one frozen, validated dataclass plus named presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["SphKVConfig", "PRESETS", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_CENTERS = ("none", "page")
_CODEBOOKS = ("analytic", "uniform")
_NONFINITE = ("raise", "zero")
_VALUE_BITS = (2, 3, 4, 8, 16)


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclass(frozen=True, slots=True)
class SphKVConfig:
    """How one attention head's keys and values are coded.

    Keys: rotate by a seeded randomized Hadamard matrix, subtract the page mean
    (``center="page"``), then code the residual as one fp16 radius plus ``head_dim - 1``
    angles of a recursive polar transform; level ``l`` (1-based) has ``head_dim / 2**l``
    angles coded with ``level_bits[l-1]`` bits each.
    Values: per-token groups of ``value_group`` coordinates, asymmetric ``value_bits``-bit
    integers with an fp16 scale and zero per group (``value_bits=16`` keeps bf16).

    Raises ``ValueError`` naming the field when a value is out of range.

    Examples
    --------
    >>> cfg = SphKVConfig.from_name("sphkv-4", head_dim=64)
    >>> cfg.level_bits[0], cfg.page_size
    (4, 64)
    """

    head_dim: int = 64
    level_bits: tuple[int, ...] = (4, 4, 4, 4, 4, 4)
    value_bits: int = 4
    value_group: int = 64
    page_size: int = 64
    center: str = "page"
    codebook: str = "analytic"
    rotation_seed: int = 0
    value_rotate: bool = True
    nonfinite: str = "raise"

    def __post_init__(self) -> None:
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim={self.head_dim!r} is not supported; allowed: {SUPPORTED_HEAD_DIMS}")
        levels = int(math.log2(self.head_dim))
        if not isinstance(self.level_bits, tuple) or len(self.level_bits) != levels:
            raise ValueError(
                f"level_bits={self.level_bits!r} must be a tuple of {levels} ints "
                f"(one per polar level for head_dim={self.head_dim})")
        for i, b in enumerate(self.level_bits):
            if not isinstance(b, int) or not 1 <= b <= 8:
                raise ValueError(f"level_bits[{i}]={b!r} is out of range; allowed: 1..8")
        if self.value_bits not in _VALUE_BITS:
            raise ValueError(f"value_bits={self.value_bits!r} is not supported; allowed: {_VALUE_BITS}")
        if self.value_group <= 0 or self.head_dim % self.value_group:
            raise ValueError(f"value_group={self.value_group!r} must be a positive divisor of head_dim={self.head_dim}")
        if not _pow2(self.page_size) or self.page_size > 4096:
            raise ValueError(f"page_size={self.page_size!r} must be a power of two in 1..4096")
        for name, allowed in (("center", _CENTERS), ("codebook", _CODEBOOKS), ("nonfinite", _NONFINITE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; allowed: {allowed}")

    @property
    def num_levels(self) -> int:
        return len(self.level_bits)

    @property
    def angle_bits(self) -> int:
        """Total angle-code bits of one key."""
        return sum((self.head_dim >> (l + 1)) * b for l, b in enumerate(self.level_bits))

    def replace(self, **changes) -> "SphKVConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, *, head_dim: int = 64, **overrides) -> "SphKVConfig":
        """Build a preset. ``name`` is one of ``PRESETS``; level bits are allocated for ``head_dim``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
        from .codebooks import optimal_level_bits

        spec = dict(PRESETS[name])
        bits_per_coord = spec.pop("angle_bits_per_coord")
        spec["level_bits"] = optimal_level_bits(head_dim, bits_per_coord)
        spec.update(overrides)
        return cls(head_dim=head_dim, **spec)


# Presets are data: angle bits per key coordinate (allocated over polar levels by
# rate-distortion, see codebooks.optimal_level_bits) and the value quantizer.
PRESETS: dict[str, dict] = {
    "sphkv-8": dict(angle_bits_per_coord=7.0, value_bits=8, value_group=64),
    "sphkv-4": dict(angle_bits_per_coord=3.5, value_bits=4, value_group=64),
    "sphkv-3": dict(angle_bits_per_coord=2.5, value_bits=3, value_group=64),
    "sphkv-2": dict(angle_bits_per_coord=1.75, value_bits=2, value_group=64),
    # Tuned on SmolLM2-135M (benchmarks/quality, essays 2K/4K): key error dominates the logit error, so
    # bits move from values to keys, and level-1 angles keep >= 3 bits. Meant to run with the first
    # tokens of each layer dense (sphkv_hf.CachePolicy(dense_sink=4)). Bits/element at 2K, all
    # metadata and 4 sink tokens counted: 4.78 / 4.03 / 2.97 / 2.53.
    "sphkv-5b": dict(angle_bits_per_coord=4.5, value_bits=4, value_group=64),
    "sphkv-4b": dict(angle_bits_per_coord=4.0, value_bits=3, value_group=64),
    "sphkv-3b": dict(angle_bits_per_coord=3.0, value_bits=2, value_group=64, page_size=128),
    "sphkv-2b": dict(angle_bits_per_coord=2.0, value_bits=2, value_group=64),
}
