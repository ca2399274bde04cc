# SPDX-License-Identifier: Apache-2.0
"""A transformers ``Cache`` that stores keys as ADA angle codes and values as group-quantized integers.

Per layer the cache holds a list of segments (:mod:`sphkv_hf.segments`) and a dense tail. New tokens
enter the tail; the forward's attention (:func:`sphkv_hf.attention.sphkv_attention_forward`) runs
over segments + tail, and afterwards, in ``mode="paged"``, every full page of the tail is coded and
appended to the prefix (the partial last page stays dense: the recent window).
:meth:`SphKVCache.compress` codes the whole tail, partial page included (compress-after-prefill).
Without a codec (``config=None``) the cache is lossless; with ``CachePolicy(page_size=P)`` its full pages
still move into (dense) segments, so the lossless cache runs the same page and window code.

Every stored slot knows its cache position, so transformers' masks (causal, sliding window, chunked,
padding) apply slot by slot (:mod:`sphkv_hf.masks`). A layer whose attention passes a ``sliding_window``
becomes a sliding layer: after each forward it drops the pages (and tail tokens) no later query can see,
so it holds about its window and its bytes count only that.

The stored prefix of a layer can be swapped for any set of segments (:meth:`SphKVLayer.replace_prefix`,
:meth:`SphKVCache.from_prefix`) — pages of several tiers, tokens dropped per kv head — without
touching positions: the cache counts positions seen (``get_seq_length``), not tokens kept, so pass
explicit ``position_ids`` (or let ``generate`` derive them from ``get_seq_length``) and dropping
never shifts a position.

Usage::

    sphkv_hf.install()                                   # registers attention "sphkv"
    model.set_attn_implementation("sphkv")
    cache = SphKVCache(SphKVConfig.from_name("sphkv-4"))
    model.generate(ids, past_key_values=cache, max_new_tokens=16)
    cache.bits_per_element()
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from sphkv import AngleKeyCodec, GroupValueQuantizer, SphKVConfig

from .attention import segment_attention
from .masks import Visibility
from .segments import CodedSegment, DenseSegment, Segment

__all__ = ["CachePolicy", "SphKVLayer", "SphKVCache"]

_MODES = ("paged", "dense")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """When tokens get coded.

    mode : ``"paged"`` codes each full page of the tail after a forward; ``"dense"`` codes nothing until
        :meth:`SphKVCache.compress` (and with ``config=None`` the cache is a plain bf16 cache).
    dense_sink : keep each layer's first ``dense_sink`` tokens (attention sinks) as dense bf16 instead of
        coding them (taken from the first tokens that get coded; ``page_size`` keeps the first page).
        Coded pages then start after the sinks, so no page mean is pulled by a sink key.
    observe_window : keep the post-RoPE queries of the last ``observe_window`` tokens per layer
        (``SphKVLayer.observed_queries``), the observation window of SnapKV-like scoring and RDR.
    page_size : for a cache without codec (``config=None``) in ``mode="paged"``: move each full page of the
        tail into a lossless :class:`DenseSegment` (the tokens as they came, no rounding), so a dense cache
        runs the same segment, page and sliding-window code as a coded one. None keeps everything in the tail.
        (A coded cache pages by its config's ``page_size``.)
    """

    mode: str = "paged"
    dense_sink: int = 0
    observe_window: int = 0
    page_size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode={self.mode!r} is not supported; allowed: {_MODES}")
        if not isinstance(self.dense_sink, int) or self.dense_sink < 0:
            raise ValueError(f"dense_sink={self.dense_sink!r} must be an int >= 0")
        if not isinstance(self.observe_window, int) or self.observe_window < 0:
            raise ValueError(f"observe_window={self.observe_window!r} must be an int >= 0")
        if self.page_size is not None and (not isinstance(self.page_size, int) or self.page_size < 1
                                           or self.page_size & (self.page_size - 1)):
            raise ValueError(f"page_size={self.page_size!r} must be a power of two >= 1 (or None)")


class SphKVLayer(CacheLayerMixin):
    """One layer: ``segments`` (the stored prefix) + dense ``tail_k``/``tail_v`` ``[B, Hkv, T, d]``."""

    is_sliding = False
    is_croppable = False

    def __init__(self, codecs: tuple[AngleKeyCodec, GroupValueQuantizer] | None, policy: CachePolicy,
                 segments: list[Segment] | None = None, seen: int = 0):
        super().__init__()
        self.codecs, self.policy = codecs, policy
        self.segments: list[Segment] = list(segments or [])
        self.seen = seen                          # positions consumed (not tokens kept)
        self.tail_k = self.tail_v = None
        self.observed_queries: torch.Tensor | None = None   # [B, Hq, W, d] float32
        self.sliding_window: int | None = None    # set by the first forward that passes one
        self._pending = False
        self._sink_done = bool(self.segments)
        # optional ``hook(layer, masses)`` after each attention: the key mass per segment slot and tail
        # token (see ``segment_attention(return_key_mass=True)``); used by decode-time RDR re-planning
        self.key_mass_hook = None

    # -- transformers layer API --------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.codecs is not None and key_states.shape[-1] != self.codecs[0].config.head_dim:
            d = self.codecs[0].config.head_dim
            raise ValueError(f"the model's head_dim={key_states.shape[-1]} differs from the cache config's "
                             f"head_dim={d}: build it with SphKVConfig.from_name(preset, "
                             f"head_dim={key_states.shape[-1]})")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.tail_k = key_states[..., :0, :]
        self.tail_v = value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hkv, M, d]`` to the tail; return them tagged for :func:`sphkv_attention_forward`."""
        if self._pending:
            raise RuntimeError("the previous forward's attention did not run through the sphkv cache; "
                               "call sphkv_hf.install() and model.set_attn_implementation('sphkv')")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.tail_k = torch.cat([self.tail_k, key_states], -2)
        self.tail_v = torch.cat([self.tail_v, value_states], -2)
        self.seen += key_states.shape[-2]
        self._pending = True
        key_states.sphkv_layer = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the masks transformers builds: every cache position ``0..seen+M-1``
        (a sliding layer keeps fewer; :class:`sphkv_hf.masks.Visibility` reads each kept slot's column)."""
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SphKVCache supports one sequence per batch row without beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SphKVCache does not expand batches (num_return_sequences > 1, beams)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("SphKVCache does not select batch rows")

    def reset(self) -> None:
        self.segments, self.seen, self._pending, self._sink_done = [], 0, False, False
        self.sliding_window = None
        self.tail_k = self.tail_v = self.observed_queries = None
        self.is_initialized = False

    # -- attention ---------------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, scale: float | None, *, mask: torch.Tensor | None = None,
               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """Queries ``[B, Hq, M, d]`` (the tail's last ``M`` tokens) → ``[B, Hq, M, d]`` float32; then roll pages.

        ``mask`` ``[B, 1, M, KV]`` (transformers' mask over cache positions ``0..KV-1``, see
        :meth:`get_mask_sizes`), ``sliding_window`` and ``softcap`` as the model passes them to its attention
        function. A layer given a ``sliding_window`` is a sliding layer from then on: after the forward it
        drops what no later query can see (whole pages; the dense tail token by token).
        """
        if not self._pending:
            raise RuntimeError("attend() without a preceding update() for this layer")
        self._set_window(sliding_window)
        vis = None
        if mask is not None or self.sliding_window is not None:
            vis = Visibility.for_queries(self.seen, query.shape[-2], mask=mask, window=self.sliding_window,
                                         device=query.device)
        kw = dict(scale=scale, softcap=softcap, visibility=vis, tail_start=self.tail_start)
        if self.key_mass_hook is None:
            out = segment_attention(query, self.segments, self.tail_k, self.tail_v, **kw)
        else:
            out, masses = segment_attention(query, self.segments, self.tail_k, self.tail_v, return_key_mass=True,
                                            **kw)
            self.key_mass_hook(self, masses)
        self._pending = False
        w = self.policy.observe_window
        if w:
            q = query.detach().to(torch.float32)
            prev = self.observed_queries
            self.observed_queries = (q if prev is None else torch.cat([prev, q], -2))[..., -w:, :]
        if self.policy.mode == "paged" and self._page_size is not None:
            self._code_tail(whole=False)
        if self.sliding_window is not None:
            self._drop_invisible()
        return out

    def _set_window(self, sliding_window: int | None) -> None:
        if sliding_window is None:
            if self.sliding_window is not None:
                raise ValueError(f"this layer was a sliding layer (window {self.sliding_window}); "
                                 "its attention now passed no sliding_window")
            return
        if not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window={sliding_window!r} must be an int >= 1")
        if self.sliding_window not in (None, sliding_window):
            raise ValueError(f"sliding_window changed from {self.sliding_window} to {sliding_window}")
        self.sliding_window = sliding_window

    @property
    def tail_start(self) -> int:
        """Cache position of the dense tail's first token."""
        return self.seen - (0 if self.tail_k is None else self.tail_k.shape[-2])

    def _drop_invisible(self) -> None:
        """Sliding layer: drop every stored token no query at position ``>= seen`` can see (``< seen - window + 1``)."""
        cutoff = self.seen - self.sliding_window + 1
        kept = [s.drop_before(cutoff) for s in self.segments]
        self.segments = [s for s in kept if s is not None]
        cut = min(max(cutoff - self.tail_start, 0), self.tail_k.shape[-2])
        if cut:
            self.tail_k, self.tail_v = self.tail_k[..., cut:, :], self.tail_v[..., cut:, :]

    # -- coding ------------------------------------------------------------------------------------
    @property
    def _page_size(self) -> int | None:
        return self.codecs[0].config.page_size if self.codecs is not None else self.policy.page_size

    def _tail_positions(self, n: int) -> torch.Tensor:
        """``[1, 1, n]`` int64 cache positions of the tail's first ``n`` tokens."""
        return torch.arange(self.tail_start, self.tail_start + n, device=self.tail_k.device)[None, None]

    def _code_tail(self, *, whole: bool) -> None:
        p = self._page_size
        if not self._sink_done:
            if self.tail_k.shape[-2] < (1 if whole else p):
                return
            s = min(self.policy.dense_sink, self.tail_k.shape[-2])
            if s:
                self.segments.append(DenseSegment.build(self.tail_k[..., :s, :], self.tail_v[..., :s, :],
                                                        page_size=p, positions=self._tail_positions(s)))
                self.tail_k, self.tail_v = self.tail_k[..., s:, :], self.tail_v[..., s:, :]
            self._sink_done = True
        t = self.tail_k.shape[-2]
        n = t if whole else (t // p) * p
        if n == 0:
            return
        k, v, pos = self.tail_k[..., :n, :], self.tail_v[..., :n, :], self._tail_positions(n)
        self.tail_k, self.tail_v = self.tail_k[..., n:, :], self.tail_v[..., n:, :]
        if self.codecs is None:                       # lossless pages: the tokens as they came
            self.segments.append(DenseSegment.build(k, v, page_size=p, positions=pos))
            return
        seg = CodedSegment.encode(k, v, *self.codecs, positions=pos)
        last = self.segments[-1] if self.segments else None
        if isinstance(last, CodedSegment) and last.full_pages and last.kcodec is seg.kcodec:
            self.segments[-1] = last.append(seg)
        else:
            self.segments.append(seg)

    def compress(self) -> None:
        """Code the whole tail now, partial last page included."""
        if self.codecs is None:
            raise ValueError("this cache has no codec (config=None): nothing to compress with")
        if self.tail_k is not None and self.tail_k.shape[-2]:
            self._code_tail(whole=True)

    def replace_prefix(self, segments: list[Segment]) -> None:
        """Swap the stored prefix for ``segments`` (tail and positions unchanged)."""
        self.segments = list(segments)
        self._sink_done = True

    def dense_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored tokens as dense ``[B, Hkv, N, d]`` (only when nothing is coded or padded)."""
        if not all(isinstance(s, DenseSegment) and s.lengths is None for s in self.segments):
            raise ValueError("dense_kv() needs a prefix of unpadded dense segments")
        ks = [s.k for s in self.segments] + ([self.tail_k] if self.tail_k is not None else [])
        vs = [s.v for s in self.segments] + ([self.tail_v] if self.tail_v is not None else [])
        return torch.cat(ks, -2), torch.cat(vs, -2)

    # -- accounting --------------------------------------------------------------------------------
    def stored_bytes(self) -> int:
        """Exact bytes: every segment's ``nbytes`` + the dense tail at 16 bits per element."""
        tail = 0 if self.tail_k is None else self.tail_k[..., 0].numel() * self.tail_k.shape[-1] * 2 * 2
        return sum(s.nbytes for s in self.segments) + tail

    def rows_and_dim(self) -> tuple[int, int]:
        """(batch × kv heads, head_dim) of this layer."""
        if self.tail_k is not None:
            return self.tail_k.shape[0] * self.tail_k.shape[1], self.tail_k.shape[-1]
        for s in self.segments:
            if isinstance(s, DenseSegment):
                return s.k.shape[0] * s.k.shape[1], s.k.shape[-1]
            return s.kcode.codes.shape[0] * s.kcode.codes.shape[1], s.kcodec.config.head_dim
        raise ValueError("empty layer")


class SphKVCache(Cache):
    """ADA-coded KV cache for transformers models (attention implementation ``"sphkv"``).

    Parameters
    ----------
    config : codec of the coded pages; ``None`` keeps everything dense (bf16 cache with the same
        attention path — the reference the compressed caches are compared against).
    policy : :class:`CachePolicy`.

    Examples
    --------
    >>> cache = SphKVCache(SphKVConfig.from_name("sphkv-4", head_dim=16, page_size=4, value_group=16))
    >>> for layer in range(2):
    ...     k, v = cache.update(torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16), layer)
    ...     _ = k.sphkv_layer.attend(torch.randn(1, 4, 6, 16), None)
    >>> [type(s).__name__ for s in cache.layers[0].segments], cache.layers[0].tail_k.shape[-2]
    (['CodedSegment'], 2)
    >>> cache.get_seq_length()
    6
    """

    def __init__(self, config: SphKVConfig | None = None, *, policy: CachePolicy = CachePolicy(),
                 layers: list[SphKVLayer] | None = None):
        self.config, self.policy = config, policy
        self.codecs = None if config is None else (AngleKeyCodec(config), GroupValueQuantizer(config))
        super().__init__(layers=list(layers or []))

    @classmethod
    def from_prefix(cls, prefix: list[list[Segment]], num_positions: int, config: SphKVConfig | None = None, *,
                    policy: CachePolicy = CachePolicy(mode="dense")) -> "SphKVCache":
        """A cache whose layer ``i`` starts with the segments ``prefix[i]`` covering ``num_positions`` positions."""
        cache = cls(config, policy=policy)
        cache.layers = [SphKVLayer(cache.codecs, policy, segs, num_positions) for segs in prefix]
        return cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(SphKVLayer(self.codecs, self.policy))
        return self.layers[layer_idx].update(key_states, value_states)

    def compress(self) -> None:
        """Code every layer's dense tail now (compress-after-prefill)."""
        for layer in self.layers:
            layer.compress()

    def stored_bytes(self) -> int:
        """Exact bytes held by all layers (codes, radii, means, scales, page metadata, dense tokens)."""
        return sum(layer.stored_bytes() for layer in self.layers)

    def bits_per_element(self) -> float:
        """``stored_bytes × 8 / (positions × layers × batch × kv heads × head_dim × 2)`` (bf16 cache = 16)."""
        seen = self.get_seq_length()
        if not self.layers or seen == 0:
            return 0.0
        rows, d = self.layers[0].rows_and_dim()
        return self.stored_bytes() * 8 / (seen * len(self.layers) * rows * d * 2)
