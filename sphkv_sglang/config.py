# SPDX-License-Identifier: Apache-2.0
"""Serving configuration of the SGLang integration: one frozen, validated dataclass.

It is built once in the launching process (from ``--sphkv-*`` flags or one ``--sphkv-config``
JSON object), validated there so a bad value stops the server before anything starts, and carried
to SGLang's spawned processes as JSON (``server_args._sphkv`` and the ``SGLANG_SPHKV``
environment variable).

Sizing vocabulary (per logical page = ``page_size`` tokens × all layers × all KV heads):
``page_bytes(tier)`` is what one page of a tier costs; the coded byte budget is split between the
tiers by ``tier_fractions``; ``cell_size`` is the resulting bytes per token SGLang sizes its pool
with; the dense *staging* area (the pages still being filled) is a fixed overhead.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass

from sphkv.config import PRESETS, SphKVConfig
from sphkv.tiers import Tier

__all__ = ["SphKVServeConfig", "ENV_VAR", "parse_bytes", "RETENTION_POLICIES_HINT"]

ENV_VAR = "SGLANG_SPHKV"
_PAGE_SIZES = (8, 16, 32, 64, 128, 256)
_NONFINITE = ("raise", "zero")
RETENTION_POLICIES_HINT = ("heuristic", "rdr", "reuse", "lru")   # kept in sync with retention.POLICIES (tested)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10 ** 6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30}


def parse_bytes(text: str | int | float) -> int:
    """``"512MiB"``, ``"1.5GiB"``, ``"200mb"``, ``123456`` → bytes (int). Raises ``ValueError``.

    Examples
    --------
    >>> parse_bytes("512MiB"), parse_bytes("1k"), parse_bytes(2048)
    (536870912, 1024, 2048)
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{text!r} is not a byte size; use e.g. 268435456, 256MiB, 1.5GiB, 200MB")
        value, unit = float(m.group(1)), m.group(2).lower()
    out = int(value * _UNITS[unit])
    if not math.isfinite(value) or out <= 0:
        raise ValueError(f"{text!r} must be a positive byte size (> 0)")
    return out


@dataclass(frozen=True, slots=True)
class SphKVServeConfig:
    """How a sphkv server stores and sizes its KV cache.

    Parameters
    ----------
    preset : top coded tier, one of ``sphkv.PRESETS`` (``sphkv-8``, ``sphkv-4``, ``sphkv-3``, ``sphkv-2``).
    demote_to : lower tiers, in order, that cold radix nodes are re-encoded into under memory
        pressure before anything is evicted. ``()`` keeps one tier.
    tier_fractions : share of the coded byte budget per tier (``preset`` first, then ``demote_to``);
        ``None`` means ``(0.75, 0.25/len(demote_to), ...)`` or ``(1.0,)``. Must sum to 1.
    budget_bytes : KV memory of the whole pool (coded arenas + staging), or ``None`` to let SGLang
        size it from free memory (``--mem-fraction-static``) and ``--max-total-tokens``.
    page_size : tokens per page; SGLang's ``--page-size`` is forced to it (page-mean centering
        needs whole pages). One of 8, 16, 32, 64, 128, 256.
    max_running_requests : SGLang's ``--max-running-requests`` when the user gives none.
    staging_pages : dense pages for the page each running request is filling; ``None`` means
        ``max_running_requests + 2``.
    retention : node retention policy of the radix cache, one of ``retention.POLICIES``: ``heuristic``
        (alias ``reuse``: demote/evict the lowest reuse × mass first), ``rdr`` (rate-distortion plan
        over unlocked nodes, :func:`sphkv.retention.plan_nodes`), ``lru``.
    track_mass : accumulate per-page attention mass (RDR's utility signal) during attention.
    rotation_seed : passed to every tier's :class:`sphkv.SphKVConfig`.
    nonfinite : what a NaN/Inf key or value row written to the pool does, passed to every tier's
        :class:`sphkv.SphKVConfig`: ``"zero"`` (default) zeroes the row, codes the page and counts it
        in ``nonfinite_rows`` — other tokens' pages are untouched and the server keeps serving;
        ``"raise"`` raises :class:`sphkv.validation.NonFiniteError` naming the layer, which SGLang
        treats as a fatal scheduler error (the server exits) — for debugging a model.

    Examples
    --------
    >>> cfg = SphKVServeConfig(preset="sphkv-4")
    >>> cfg.tiers, cfg.fractions
    (('sphkv-4', 'sphkv-2'), (0.75, 0.25))
    >>> round(cfg.cell_size(num_layers=30, num_kv_heads=3, head_dim=64), 1) < 23040 / 3.5
    True
    """

    preset: str = "sphkv-4"
    demote_to: tuple[str, ...] | None = None
    tier_fractions: tuple[float, ...] | None = None
    budget_bytes: int | None = None
    page_size: int = 64
    max_running_requests: int = 32
    staging_pages: int | None = None
    retention: str = "heuristic"
    track_mass: bool = True
    rotation_seed: int = 0
    nonfinite: str = "zero"

    def __post_init__(self) -> None:
        presets = sorted(PRESETS)
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not a preset; allowed: {presets}")
        for name in self.tiers[1:]:
            if name not in PRESETS:
                raise ValueError(f"demote_to entry {name!r} is not a preset; allowed: {presets}")
        if len(set(self.tiers)) != len(self.tiers):
            raise ValueError(f"demote_to={self.demote_to!r} repeats a tier of {self.tiers}")
        fr = self.fractions
        if len(fr) != len(self.tiers) or any(not (0.0 <= f <= 1.0) for f in fr) or abs(sum(fr) - 1) > 1e-6 \
                or fr[0] <= 0:
            raise ValueError(f"tier_fractions={self.tier_fractions!r} must be {len(self.tiers)} numbers in [0, 1] "
                             f"summing to 1 (first > 0), one per tier {self.tiers}")
        if self.budget_bytes is not None and (not isinstance(self.budget_bytes, int) or self.budget_bytes <= 0):
            raise ValueError(f"budget_bytes={self.budget_bytes!r} must be a positive number of bytes (> 0)")
        if self.page_size not in _PAGE_SIZES:
            raise ValueError(f"page_size={self.page_size!r} is not supported; allowed: {_PAGE_SIZES}")
        if not isinstance(self.max_running_requests, int) or self.max_running_requests < 1:
            raise ValueError(f"max_running_requests={self.max_running_requests!r} must be an int >= 1")
        if self.staging_pages is not None and (not isinstance(self.staging_pages, int) or self.staging_pages < 2):
            raise ValueError(f"staging_pages={self.staging_pages!r} must be an int >= 2")
        if self.retention not in RETENTION_POLICIES_HINT:
            raise ValueError(f"retention={self.retention!r} is not a policy; allowed: {RETENTION_POLICIES_HINT}")
        if self.nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite={self.nonfinite!r} is not supported; allowed: {_NONFINITE}")

    # -- derived -------------------------------------------------------------------------------
    @property
    def tiers(self) -> tuple[str, ...]:
        """Tier names, most precise first."""
        if self.demote_to is not None:
            return (self.preset, *self.demote_to)
        return (self.preset,) if self.preset == "sphkv-2" else (self.preset, "sphkv-2")

    @property
    def fractions(self) -> tuple[float, ...]:
        if self.tier_fractions is not None:
            return tuple(float(f) for f in self.tier_fractions)
        n = len(self.tiers)
        return (1.0,) if n == 1 else (0.75, *([0.25 / (n - 1)] * (n - 1)))

    @property
    def num_staging_pages(self) -> int:
        return self.staging_pages if self.staging_pages is not None else self.max_running_requests + 2

    def codec_config(self, name: str, head_dim: int) -> SphKVConfig:
        """The :class:`SphKVConfig` of tier ``name`` for ``head_dim`` (raises ValueError naming head_dim)."""
        return SphKVConfig.from_name(name, head_dim=head_dim, page_size=self.page_size,
                                     rotation_seed=self.rotation_seed, nonfinite=self.nonfinite)

    def page_bytes(self, name: str, *, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes of one logical page of tier ``name`` across all layers and KV heads (metadata included)."""
        tier = Tier(name, self.codec_config(name, head_dim))
        return tier.page_bytes(head_dim, self.page_size) * num_layers * num_kv_heads

    def cell_size(self, *, num_layers: int, num_kv_heads: int, head_dim: int) -> float:
        """Coded bytes per token (all layers and heads) for the tier mix: ``1 / Σ_t f_t / bytes_t``."""
        inv = sum(f / self.page_bytes(t, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
                  for t, f in zip(self.tiers, self.fractions))
        return 1.0 / inv / self.page_size

    def staging_bytes(self, *, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        """Dense bf16 K and V of the staging pages (fixed overhead of the pool)."""
        return self.num_staging_pages * self.page_size * num_layers * num_kv_heads * head_dim * 2 * 2

    # -- serialization -------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "--sphkv-config") -> "SphKVServeConfig":
        """Build from a JSON object; unknown keys raise ``ValueError`` listing the allowed keys."""
        if not isinstance(data, dict):
            raise ValueError(f"{source} must be a JSON object, got {type(data).__name__}: {data!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; allowed: {allowed}")
        data = dict(data)
        for key in ("demote_to", "tier_fractions"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        if isinstance(data.get("budget_bytes"), (str, float)):
            data["budget_bytes"] = parse_bytes(data["budget_bytes"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str, *, source: str = "--sphkv-config") -> "SphKVServeConfig":
        """Parse a JSON object; a syntax error quotes the offending text and position."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            lo = max(0, e.pos - 20)
            raise ValueError(f"{source} is not valid JSON ({e.msg} at char {e.pos}): "
                             f"{text!r}; near {text[lo:e.pos + 20]!r}") from None
        return cls.from_dict(data, source=source)
