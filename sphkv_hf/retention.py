# SPDX-License-Identifier: Apache-2.0
"""Rate-Distortion Retention (RDR) for :class:`sphkv_hf.SphKVCache`: compress after prefill, re-plan in decode.

* :func:`store_segments` — one layer of a :class:`sphkv.pages.PagedStore` as cache segments: per tier
  one segment whose row ``h`` holds kv head ``h``'s pages of that tier back to back (per-head
  ``lengths``; padding slots masked). ADA tiers become :class:`CodedSegment` built from the store's
  own codes (logits from codes, the page means of the store line up with the segment's page grid),
  dense tiers :class:`DenseSegment` over the stored bf16, grid tiers fake-quant :class:`DenseSegment`.
  Each segment's ``nbytes`` is its pages' exact bytes (page metadata included), so the segments of
  all layers add up to ``store.bytes().stored_bytes``.
* :func:`compress_cache` — prefill with ``CachePolicy(mode="dense", observe_window=W)``, then
  compress every layer under a budget (fraction of the bf16 bytes or exact bytes) with the cache's
  observed queries as the observation window. Positions are untouched: the cache counts positions
  seen, so dropping tokens never shifts a position.
* :class:`Replanner` — optional decode-time re-planning: accumulates the attention mass each stored
  token receives (:class:`sphkv.retention.AttentionMassTracker`, through ``SphKVLayer.key_mass_hook``)
  and every ``every`` steps shrinks the store (:func:`sphkv.retention.shrink_store`: demote or free
  pages, never promote) so that store + dense tail fit the budget again.

Limitation: decoded tokens stay in each layer's dense tail (bf16, counted in the bytes); re-planning
only shrinks the compressed prefix to make room for them, it does not move tail tokens into pages.
When the prefix cannot shrink further (only protected sink pages left) :meth:`Replanner.replan`
raises ``ValueError``.

Usage::

    cache = SphKVCache(None, policy=CachePolicy(mode="dense", observe_window=32))
    model(input_ids=ids, past_key_values=cache)                 # prefill
    res = compress_cache(cache, 0.10)                           # ADA + RDR at 10% of the bf16 bytes
    model.generate(..., past_key_values=cache)                  # positions continue at ids.shape[-1]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sphkv.pages import PagedStore
from sphkv.pages.arenas import kind_of, tier_kind
from sphkv.retention import AttentionMassTracker, RetentionConfig, RetentionResult, VARIANTS, compress_prefill
from sphkv.retention import compress_variant
from sphkv.retention import protected_mask, shrink_store
from sphkv.keys import KeyCode
from sphkv.values import ValueCode

from .cache import SphKVCache
from .segments import CodedSegment, DenseSegment, Segment

__all__ = ["store_segments", "store_prefix", "compress_cache", "ReplanConfig", "Replanner"]


def _ordered_pages(store: PagedStore, layer: int, head: int, tier: int):
    """Pages of ``tier`` of one head, full pages first; at most one partial page (compact otherwise)."""
    metas = [m for m in store.pages(layer, head) if m.tier == tier]
    partial = [m for m in metas if m.count < store.page_size]
    if len(partial) > 1:
        store.compact(layer, head)
        return _ordered_pages(store, layer, head, tier)
    return [m for m in metas if m.count == store.page_size] + partial


def _pad_rows(rows: list[torch.Tensor], n: int, fill=0) -> torch.Tensor:
    """Rows ``[n_i, ...]`` → ``[1, H, n, ...]`` padded with ``fill``."""
    out = torch.full((1, len(rows), n, *rows[0].shape[1:]), fill, dtype=rows[0].dtype, device=rows[0].device)
    for h, r in enumerate(rows):
        out[0, h, :r.shape[0]] = r
    return out


def store_segments(store: PagedStore, layer: int) -> list[Segment]:
    """Segments of one layer of ``store`` (one per non-empty tier; see the module docstring).

    Returns segments with ``lengths`` ``[1, Hkv]`` int64 and ``positions`` ``[1, Hkv, N]`` int64
    (original positions, ``-1`` on padding); ``Σ nbytes`` equals the layer's stored bytes.
    """
    hkv, p = store.num_kv_heads, store.page_size
    segs: list[Segment] = []
    for t, tier in enumerate(store.tierset.tiers):
        pages = [_ordered_pages(store, layer, h, t) for h in range(hkv)]
        if not any(pages):
            continue
        counts = [sum(m.count for m in ms) for ms in pages]
        lengths = torch.tensor([counts], dtype=torch.int64)
        nbytes = sum(len(ms) for ms in pages) * store.page_bytes[t]
        arena, kind = store.arenas[t], tier_kind(tier)
        if kind == "ada":
            m = max(len(ms) for ms in pages)
            ids = torch.zeros(hkv, m, dtype=torch.int64)            # page 0: the padding page
            for h, ms in enumerate(pages):
                ids[h, :len(ms)] = torch.tensor([x.page for x in ms], dtype=torch.int64)
            g = lambda x: x[ids.to(x.device)].flatten(1, 2)[None]  # noqa: E731   [1, Hkv, m*P, ...]
            mean = arena.k_mean[ids.to(arena.k_mean.device)][None] if arena.kcodec.config.center == "page" else None
            kcode = KeyCode(g(arena.k_codes), g(arena.k_radius), mean)
            vcode = ValueCode(g(arena.v_codes), g(arena.v_scale), g(arena.v_zero))
            pos = _pad_rows([torch.cat([x.positions.to(torch.int64) for x in ms]) if ms else
                             torch.empty(0, dtype=torch.int64) for ms in pages], m * p, -1)
            segs.append(CodedSegment(nbytes, kcode=kcode, vcode=vcode, kcodec=arena.kcodec, vquant=arena.vquant,
                                     lengths=lengths, positions=pos))
            continue
        ks, vs, ps = [], [], []
        for ms in pages:
            if ms:
                k, v = kind_of(tier).decode(arena, torch.tensor([x.page for x in ms]),
                                            torch.tensor([x.count for x in ms]))
                if kind == "dense":                                   # exactly the stored bf16
                    k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)
                ks.append(k)
                vs.append(v)
                ps.append(torch.cat([x.positions.to(torch.int64) for x in ms]))
            else:
                dt = torch.bfloat16 if kind == "dense" else torch.float32
                ks.append(torch.empty(0, store.head_dim, dtype=dt))
                vs.append(torch.empty(0, store.head_dim, dtype=dt))
                ps.append(torch.empty(0, dtype=torch.int64))
        n = max(counts)
        segs.append(DenseSegment(nbytes, k=_pad_rows(ks, n), v=_pad_rows(vs, n), lengths=lengths,
                                 positions=_pad_rows(ps, n, -1)))
    return segs


def store_prefix(store: PagedStore) -> list[list[Segment]]:
    """:func:`store_segments` for every layer."""
    return [store_segments(store, l) for l in range(store.num_layers)]


def compress_cache(cache: SphKVCache, budget_fraction: float | None = None, *, budget_bytes: int | None = None,
                   variant: str = "ada+rdr", config: RetentionConfig = RetentionConfig(), page_size: int = 64,
                   sm_scale: float | None = None) -> RetentionResult:
    """Compress a prefilled cache in place under a byte budget with RDR.

    Parameters
    ----------
    cache : batch-1 cache whose layers hold only dense tokens (prefill with ``CachePolicy(mode="dense",
        observe_window=W)``, ``W >= 1``: the observed queries are RDR's observation window).
    budget_fraction : budget as a fraction of the bf16 bytes of the tokens stored; or ``budget_bytes``.
    variant : a key of :data:`sphkv.retention.VARIANTS` (``"ada+rdr"``, ``"rdkv"``, ``"dense+rdr"``).

    Returns
    -------
    The :class:`sphkv.retention.RetentionResult` (also kept as ``cache.retention``). Afterwards every
    layer's prefix is :func:`store_segments` of its store and its tail is empty, so
    ``cache.stored_bytes() == result.stored_bytes <= budget``; ``get_seq_length()`` is unchanged.

    Sliding layers (a model with sliding-window layers) already hold only their window, all of it visible to
    the next query: RDR leaves them as they are and plans only the global layers (``cache.retention_layers``,
    store layer ``j`` = cache layer ``retention_layers[j]``). The budget covers both: a fraction applies to the
    bf16 bytes of every token held (global layers' positions + the windows), the windows' bytes come off it,
    and ``cache.stored_bytes() == result.stored_bytes + window bytes <= budget``.
    """
    if config.dense_sinks:
        raise ValueError(f"config.dense_sinks={config.dense_sinks} is not supported by compress_cache (its layers hold "
                         "the store's pages only); keep sinks dense with CachePolicy(dense_sink=) or use dense_sinks=0")
    if not cache.layers:
        raise ValueError("the cache is empty: prefill before compress_cache")
    planned = [i for i, layer in enumerate(cache.layers) if layer.sliding_window is None]
    if not planned:
        raise ValueError("every layer is a sliding layer: its window is all it keeps, nothing is left for RDR to plan")
    keys, values, queries = [], [], []
    for i in planned:
        layer = cache.layers[i]
        if layer.observed_queries is None:
            raise ValueError(f"layer {i} observed no queries: prefill with CachePolicy(observe_window=W), W >= 1")
        k, v = layer.dense_kv()
        if k.shape[0] != 1:
            raise ValueError(f"compress_cache needs batch 1, got batch {k.shape[0]}")
        if k.shape[-2] != layer.seen:
            raise ValueError(f"layer {i} holds {k.shape[-2]} of {layer.seen} positions: compress_cache plans a "
                             "freshly prefilled cache (every position kept)")
        keys.append(k.to(torch.float32))
        values.append(v.to(torch.float32))
        queries.append(layer.observed_queries)
    if budget_bytes is None and budget_fraction is None:
        raise ValueError("give budget_fraction or budget_bytes")
    if budget_bytes is None and not 0.0 < budget_fraction <= 1.0:
        raise ValueError(f"budget_fraction={budget_fraction!r} must be in (0, 1]")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not registered; allowed: {sorted(VARIANTS)}")
    windows = [i for i in range(len(cache.layers)) if i not in planned]
    if not windows and budget_bytes is None:
        res = compress_variant(variant, keys, values, queries, budget_fraction, config=config,
                               page_size=page_size, sm_scale=sm_scale)
    else:
        # Sliding layers keep exactly their window (every token of it stays visible to the next query; nothing
        # outside it is kept), untouched by RDR; their bytes come off the budget, RDR plans the global layers.
        window_bytes = sum(cache.layers[i].stored_bytes() for i in windows)
        if budget_bytes is None:
            held = sum(cache.layers[i].rows_and_dim()[0] * cache.layers[i].rows_and_dim()[1] *
                       (cache.layers[i].seen if i in planned else _held_tokens(cache.layers[i]))
                       for i in range(len(cache.layers)))
            budget_bytes = int(budget_fraction * held * 2 * 2)
        rdr_budget = budget_bytes - window_bytes
        if rdr_budget <= 0:
            raise ValueError(f"the sliding layers' windows alone take {window_bytes} bytes, budget_bytes="
                             f"{budget_bytes}: nothing is left for the global layers")
        res = compress_prefill(keys, values, queries, VARIANTS[variant](keys[0].shape[-1], page_size),
                               budget_bytes=rdr_budget, config=config, sm_scale=sm_scale)
    for j, i in enumerate(planned):
        layer = cache.layers[i]
        layer.replace_prefix(store_segments(res.store, j))
        layer.tail_k, layer.tail_v = layer.tail_k[..., :0, :], layer.tail_v[..., :0, :]
    cache.retention = res
    cache.retention_layers = tuple(planned)
    return res


def _held_tokens(layer) -> int:
    return sum(s.num_tokens for s in layer.segments) + (0 if layer.tail_k is None else layer.tail_k.shape[-2])


@dataclass(frozen=True, slots=True)
class ReplanConfig:
    """Decode-time re-planning: every ``every`` decode steps shrink the store so store + tail ≤ ``budget_bytes``.

    ``decay`` is the EMA factor of :class:`sphkv.retention.AttentionMassTracker` (``mode="ema"``);
    ``sinks`` first positions are never demoted or dropped.
    """

    budget_bytes: int
    every: int = 16
    decay: float = 0.9
    sinks: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.budget_bytes, int) or self.budget_bytes < 1:
            raise ValueError(f"budget_bytes={self.budget_bytes!r} must be an int >= 1")
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every={self.every!r} must be an int >= 1")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay={self.decay!r} must be in [0, 1)")
        if self.sinks < 0:
            raise ValueError(f"sinks={self.sinks!r} must be >= 0")


class Replanner:
    """Tracks attention mass on a compressed cache and re-plans it every ``config.every`` steps.

    Attach after :func:`compress_cache`; call :meth:`step` after every decode forward (e.g. from a
    ``transformers`` ``StoppingCriteria`` that returns ``False``, or in a manual loop). :meth:`close`
    removes the hooks.
    """

    def __init__(self, cache: SphKVCache, config: ReplanConfig):
        res: RetentionResult | None = getattr(cache, "retention", None)
        if res is None:
            raise ValueError("the cache was not compressed with compress_cache")
        self.cache, self.config, self.store = cache, config, res.store
        self.layers = getattr(cache, "retention_layers", tuple(range(len(cache.layers))))   # store layer → cache layer
        self.tracker = AttentionMassTracker(res.utility.to(torch.float32), decay=config.decay)
        self.steps, self.reports = 0, []
        for l, i in enumerate(self.layers):
            cache.layers[i].key_mass_hook = self._hook(l)

    def _hook(self, l: int):
        def hook(layer, masses):
            pos, mass = [], []
            for seg, m in zip(layer.segments, masses[:-1]):
                sel = seg.positions[0] >= 0                                       # [Hkv, N]
                p = seg.positions[0].clamp_min(0)
                dense = torch.zeros(m.shape[1], int(p.max()) + 1 if p.numel() else 0)
                dense.scatter_add_(1, p, m[0].float() * sel)
                pos.append(dense)
            t = masses[-1].shape[-1]
            tail = torch.zeros(masses[-1].shape[1], layer.seen)
            tail[:, layer.seen - t:] = masses[-1][0].float()
            n = max([layer.seen] + [x.shape[-1] for x in pos])
            total = torch.nn.functional.pad(tail, (0, n - tail.shape[-1]))
            for x in pos:
                total[:, :x.shape[-1]] += x
            self.tracker.update(l, total)
        return hook

    def tail_bytes(self) -> int:
        """Bytes outside the store: the planned layers' dense tails and the sliding layers' windows."""
        planned = set(self.layers)
        return sum(layer.stored_bytes() - (sum(s.nbytes for s in layer.segments) if i in planned else 0)
                   for i, layer in enumerate(self.cache.layers))

    def step(self) -> bool:
        """Count one decode step; re-plan when due. Returns True when it re-planned."""
        self.steps += 1
        if self.steps % self.config.every:
            return False
        self.replan()
        return True

    def replan(self):
        """Shrink the store so that store + tail bytes ≤ the budget; refresh every layer's segments."""
        target = self.config.budget_bytes - self.tail_bytes()
        if target < 0:
            raise ValueError(f"the dense tail alone ({self.tail_bytes()} bytes) exceeds budget_bytes="
                             f"{self.config.budget_bytes}")
        u = self.tracker.utility()
        rep = shrink_store(self.store, u, target, protected=protected_mask(u.shape[-1], sinks=self.config.sinks,
                                                                            recent=0))
        for l, i in enumerate(self.layers):
            self.cache.layers[i].replace_prefix(store_segments(self.store, l))
        self.reports.append(rep)
        return rep

    def close(self) -> None:
        for layer in self.cache.layers:
            layer.key_mass_hook = None
