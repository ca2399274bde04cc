# SPDX-License-Identifier: Apache-2.0
"""The interface every KV-compression method of the quality harness implements, and its registry.

A method turns the dense KV of a prefilled context into a compressed prefix::

    class Method(Protocol):
        name: str
        budget_fraction: float | None      # eviction / retention budgets; None for pure quantizers
        def build(self, ctx: PrefillContext) -> CompressedPrefix: ...

* :class:`PrefillContext` holds, per layer ``l``, the post-RoPE dense keys and values
  ``keys[l]``, ``values[l]`` ``[1, Hkv, N, d]`` (model dtype, bf16: this *is* the full bf16 cache),
  the post-RoPE queries of the context's last ``W`` tokens ``queries[l]`` ``[1, Hq, W, d]`` float32
  (the observation window), the model config, and ``dense_bytes`` (bytes of the bf16 prefix, the
  reference a budget fraction multiplies). A needle context also names its ``base`` (the plain context)
  and how many leading tokens it ``shared`` with it, so a method may reuse work; ignoring them is fine.
  ``pooled_queries`` hold the post-RoPE queries at ``pooled_positions`` — strided over the whole context
  plus the observation window (what a query-agnostic utility pools; still no question involved).
  ``surprisal()`` (computed on first call) returns each context token's ``-log p(x_t | x_<t)`` under the model
  ``[N]`` float32, from the prefill's own final hidden states (token 0: 0) — the information content a query-agnostic utility may weigh;
  ``reconstruction()`` (computed on first call: one extra forward) the KVzip-style score ``[L, Hkv, N]``: the
  largest attention each context token draws while the model is asked to repeat the context.
* :class:`CompressedPrefix` holds per layer a list of :mod:`sphkv_hf.segments` segments (dense or
  ADA-coded, optionally padded per kv head with ``lengths``), which :class:`sphkv_hf.SphKVCache`
  attends over; ``nbytes`` is the exact sum of the segments' stored bytes (codes, radii, means,
  scales, zeros, page metadata, dense tokens) and ``bits_per_element`` divides by
  ``N × layers × Hkv × d × 2`` (16.0 for the full bf16 cache).
* Fake-quant baselines may store dequantized dense tensors in a :class:`DenseSegment` as long as
  they pass the exact ``nbytes`` of their real format; ADA segments compute logits from codes.

Registering a method (e.g. in a separate module ``benchmarks/quality/methods_rdr.py``; every module
named ``methods_*.py`` in this package is imported by ``run.py``)::

    from benchmarks.quality.methods import register
    register("ada+rdr@0.10", lambda: MyRDR(fraction=0.10), quick=True)

``quick=True`` puts the method in ``--quick`` runs too; ``group`` names its curve in the plot.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from sphkv_hf.segments import Segment

__all__ = ["PrefillContext", "CompressedPrefix", "Method", "MethodEntry", "REGISTRY", "register", "get_method",
           "max_tokens_for_bytes"]


@dataclass(frozen=True)
class PrefillContext:
    """Dense prefill state of one context (see module docstring for shapes)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor]
    model_config: object
    base: "PrefillContext | None" = None    # another context whose first ``shared`` tokens have the same K/V
    shared: int = 0                         # (a method may reuse its encoding of ``base`` for those tokens)
    pooled_queries: list[torch.Tensor] | None = None   # per layer [1, Hq, M, d] float32 at ``pooled_positions``
    pooled_positions: torch.Tensor | None = None       # [M] int64: strided over the context + the last window
    surprisal: Callable[[], torch.Tensor] | None = None        # () -> [N] float32 -log p(x_t | x_<t) (token 0: 0)
    reconstruction: Callable[[], torch.Tensor] | None = None   # () -> [L, Hkv, N] float32, computed on first call

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[-2]

    @property
    def num_kv_heads(self) -> int:
        return self.keys[0].shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys[0].shape[-1]

    @property
    def dense_bytes(self) -> int:
        """Bytes of the full bf16 prefix (all layers, K and V)."""
        return self.num_layers * self.num_kv_heads * self.num_tokens * self.head_dim * 2 * 2


@dataclass(frozen=True)
class CompressedPrefix:
    """Per-layer segments covering ``num_positions`` context positions."""

    segments: list[list[Segment]]
    num_positions: int
    elements: int = field(default=0)          # N × layers × Hkv × d × 2, set by :meth:`of`

    @classmethod
    def of(cls, segments: list[list[Segment]], ctx: PrefillContext) -> "CompressedPrefix":
        return cls(segments, ctx.num_tokens, ctx.dense_bytes // 2)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for layer in self.segments for s in layer)

    @property
    def bits_per_element(self) -> float:
        return self.nbytes * 8 / self.elements


class Method(Protocol):
    name: str
    budget_fraction: float | None

    def build(self, ctx: PrefillContext) -> CompressedPrefix: ...


@dataclass(frozen=True)
class MethodEntry:
    factory: Callable[[], Method]
    quick: bool
    group: str


REGISTRY: dict[str, MethodEntry] = {}


def register(name: str, factory: Callable[[], Method], *, quick: bool = False, group: str | None = None) -> None:
    """Add ``name`` → ``factory`` (a zero-argument callable returning a :class:`Method`)."""
    if name in REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    REGISTRY[name] = MethodEntry(factory, quick, group or name.split("@")[0].rstrip("-0123456789") or name)


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; allowed: {sorted(REGISTRY)}")
    return REGISTRY[name].factory()


def max_tokens_for_bytes(budget: float, bytes_per_token: int, *, page_size: int, page_meta: int,
                         num_tokens: int) -> int:
    """Largest ``k ≤ num_tokens`` with ``k·bytes_per_token + ceil(k / page_size)·page_meta ≤ budget``."""
    k = min(num_tokens, int(budget // bytes_per_token))
    while k > 0 and k * bytes_per_token + -(-k // page_size) * page_meta > budget:
        k -= 1
    return k
