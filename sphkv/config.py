# SPDX-License-Identifier: Apache-2.0
"""Configuration of the Spherical KV codec: one frozen, validated dataclass plus named presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["SphKVConfig", "PRESETS", "SUPPORTED_HEAD_DIMS", "num_polar_levels", "pattern_level_bits"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_CENTERS = ("none", "page")
_CODEBOOKS = ("analytic", "uniform")
_NONFINITE = ("raise", "zero")
_VALUE_BITS = (2, 3, 4, 8, 16)


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def num_polar_levels(head_dim: int) -> int:
    """Polar levels of a key of ``head_dim`` coordinates: ``log2(head_dim)`` (raises for unsupported sizes)."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim!r} is not supported; allowed: {SUPPORTED_HEAD_DIMS}")
    return int(math.log2(head_dim))


def pattern_level_bits(head_dim: int, pattern: tuple[int, int, int]) -> tuple[int, ...]:
    """Bits per level from ``(first, middle, last)``: level 1 gets ``first``, the last level ``last``, every
    level in between ``middle`` — the same shape of allocation at any ``head_dim``.

    >>> pattern_level_bits(64, (2, 1, 2)), pattern_level_bits(256, (2, 1, 2))
    ((2, 1, 1, 1, 1, 2), (2, 1, 1, 1, 1, 1, 1, 2))
    """
    first, middle, last = pattern
    levels = num_polar_levels(head_dim)
    return (first,) + (middle,) * (levels - 2) + (last,)


@dataclass(frozen=True, slots=True)
class SphKVConfig:
    """How one attention head's keys and values are coded.

    Keys: rotate by a seeded randomized Hadamard matrix, subtract the page mean
    (``center="page"``), then code the residual as one fp16 radius plus ``head_dim - 1``
    angles of a recursive polar transform; level ``l`` (1-based) has ``head_dim / 2**l``
    angles coded with ``level_bits[l-1]`` bits each. There are ``log2(head_dim)`` levels;
    ``level_bits=None`` (the default) means 4 bits on every level of that ``head_dim``.
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
    level_bits: tuple[int, ...] | None = None
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
        if self.level_bits is None:
            object.__setattr__(self, "level_bits", (4,) * levels)
        if not isinstance(self.level_bits, tuple) or len(self.level_bits) != levels:
            raise ValueError(
                f"level_bits={self.level_bits!r} must be a tuple of {levels} ints "
                f"(one per polar level for head_dim={self.head_dim})")
        for i, b in enumerate(self.level_bits):
            if not isinstance(b, int) or not 1 <= b <= 8:
                raise ValueError(f"level_bits[{i}]={b!r} is out of range; allowed: 1..8")
        if self.value_bits not in _VALUE_BITS:
            raise ValueError(f"value_bits={self.value_bits!r} is not supported; allowed: {_VALUE_BITS}")
        if not isinstance(self.value_group, int) or self.value_group <= 0 or self.head_dim % self.value_group:
            allowed = tuple(g for g in range(1, self.head_dim + 1) if self.head_dim % g == 0)
            raise ValueError(f"value_group={self.value_group!r} must divide head_dim={self.head_dim}; allowed: {allowed}")
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
        """Build a preset for ``head_dim``. ``name`` is one of ``PRESETS``.

        Nothing in a preset depends on one head size: level bits are allocated over the ``log2(head_dim)``
        levels (``angle_bits_per_coord`` by rate-distortion, or a ``level_pattern`` (first, middle, last)),
        and ``value_group`` is capped at ``head_dim``. ``overrides`` replace fields of the result.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim={head_dim!r} is not supported; allowed: {SUPPORTED_HEAD_DIMS}")
        spec = dict(PRESETS[name])
        (key,) = [k for k in _LEVEL_RULES if k in spec]
        spec["level_bits"] = _LEVEL_RULES[key](head_dim, spec.pop(key))
        spec["value_group"] = min(spec.get("value_group", head_dim), head_dim)
        spec.update(overrides)
        return cls(head_dim=head_dim, **spec)


def _rd_level_bits(head_dim: int, bits_per_coord: float) -> tuple[int, ...]:
    from .codebooks import optimal_level_bits

    return optimal_level_bits(head_dim, bits_per_coord)


# How a preset states its key bits (exactly one key per preset); each rule derives the levels from head_dim.
_LEVEL_RULES = {"angle_bits_per_coord": _rd_level_bits, "level_pattern": pattern_level_bits}

# Presets are data: angle bits per key coordinate (allocated over polar levels by
# rate-distortion, see codebooks.optimal_level_bits) or a (first, middle, last) level pattern,
# and the value quantizer.
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
    # The low end (~2.2 bits at head_dim 64 with sinks): 2-bit first and last levels, 1 bit in between.
    "sphkv-2b-lo": dict(level_pattern=(2, 1, 2), value_bits=2, value_group=64, page_size=128),
}
