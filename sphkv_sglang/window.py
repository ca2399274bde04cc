# SPDX-License-Identifier: Apache-2.0
"""Sliding-window layers in the sphkv SGLang backend: every query reads only its window.

Convention (SGLang's ``RadixAttention.sliding_window_size`` ``W``, FlashInfer's ``window_left``): the query
at position ``i`` sees the key at position ``j`` iff ``0 <= i - j <= W``. Gemma 2/3 pass
``config.sliding_window - 1``, so Gemma 3's 512-token HF window is ``W = 511`` (512 keys, the query's own
included), the same set transformers' mask gives.

* **Decode** (one query per request at position ``L - 1``, its K/V already written): the window is
  ``[s, L)`` with ``s = max(0, L - 1 - W)``. The pages that lie wholly inside it, ``[⌈s/P⌉·P, L)``, go
  through a second plan of the ``flashinfer_ext`` prefill wrapper (the same C++/Triton kernels as the
  global layers; :meth:`SphKVStore.plan_pages` on the slot rows shifted by whole pages); the visible
  tokens of the head page, ``[s, ⌈s/P⌉·P)``, are read densely (a staging page as stored, a coded page
  decoded through the store's codecs) and merged with the wrapper's state by log-sum-exp. One plan per
  (forward, ``W``), shared by every sliding layer with that window.
* **Extend** (prefill, chunked prefill, mixed batches): the new tokens of a request go in query blocks
  of ``BLOCK``; the block ``[a, a + BLOCK)`` reads keys ``[max(0, a - W), a + BLOCK)`` — the cached part
  densely from the store (at most ``W`` tokens, decoded once per request and layer), the new part from
  this forward's ``k`` / ``v`` — with the mask above, soft-capping, float32 math. Cost is linear in the
  prompt length (``O(n·(W + BLOCK))``), not quadratic.

What this does not do: free pages that fall out of every window. The sphkv pool stores all layers of
a token in one page (one page table for the model), and the global layers of a hybrid model (Gemma 3:
one layer in six) keep reading every page, so a page never leaves *every* window; only an all-sliding
model could free them, and that would need per-layer page tables (not implemented). The attention-mass
signal for RDR is sampled on the global layers only.
"""
from __future__ import annotations

import torch

from flashinfer_ext import BatchPrefillWithSphKVPagedKVCacheWrapper
from sphkv.attention import attention_state, dense_attention, merge_state

from .page_table import PageTableError

__all__ = ["BLOCK", "is_sliding", "window_start", "page_tokens", "dense_tokens", "window_attention",
           "SlidingWindowAttention"]

BLOCK = 512       # extend: query rows per block (keys per block: at most W + BLOCK)


def is_sliding(layer) -> bool:
    """True for a layer with a sliding window (``sliding_window_size`` set and ``> -1``)."""
    w = getattr(layer, "sliding_window_size", None)
    return w is not None and int(w) > -1


def window_start(lens: torch.Tensor, window: int) -> torch.Tensor:
    """First visible key position ``max(0, L - 1 - W)`` of the last query of each length ``lens`` ``[B]``."""
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    return (lens.to(torch.int64) - 1 - window).clamp_min(0)


def page_tokens(store, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[n, H, P, d]`` float32 of logical ``pages`` ``[n]`` (``layer``: local layer).

    Staged pages are read as stored; coded pages are decoded through the store's codecs (rotation undone, page
    mean added), one call per tier. A page neither staged nor coded raises :class:`PageTableError`."""
    pages = pages.to("cpu", torch.int64)
    n, t = pages.numel(), store.table
    k = torch.empty(n, store.H, store.P, store.d, dtype=torch.float32, device=store.device)
    v = torch.empty_like(k)
    stage, tier = t.stage_of[pages].to(torch.int64), t.tier_of[pages].to(torch.int64)
    lost = (stage < 0) & (tier < 0)
    if bool(lost.any()):
        raise PageTableError(f"layer {layer}: window page(s) {pages[lost].tolist()[:8]} are neither staged nor coded "
                             "(read after free?)")
    sel = (stage >= 0).nonzero().flatten()
    if sel.numel():
        idx = stage[sel].to(store.device)
        k[sel.to(store.device)] = store.k_stage[layer, idx].float()
        v[sel.to(store.device)] = store.v_stage[layer, idx].float()
    for tr in torch.unique(tier[stage < 0]).tolist():
        sel = ((stage < 0) & (tier == tr)).nonzero().flatten()
        kd, vd = store._decode(layer, tr, t.phys_of[pages[sel]].long())     # [m, H, P, d]
        k[sel.to(store.device)], v[sel.to(store.device)] = kd, vd
    return k, v


def dense_tokens(store, layer: int, slots: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[H, end - start, d]`` float32 of positions ``start .. end - 1`` of one request.

    ``slots``: the request's ``req_to_token`` row (token slots in position order); ``layer``: local layer.
    Read through :func:`page_tokens` (staged pages as stored, coded pages decoded); a page neither staged nor
    coded raises :class:`PageTableError` (read after free).
    """
    if end <= start:
        empty = torch.empty(store.H, 0, store.d, dtype=torch.float32, device=store.device)
        return empty, empty.clone()
    P = store.P
    sl = slots[start:end].to("cpu", torch.int64)
    page, off = sl // P, sl % P
    first = torch.ones_like(page, dtype=torch.bool)
    first[1:] = page[1:] != page[:-1]                                        # a new page starts here
    which = torch.cumsum(first.to(torch.int64), 0) - 1                        # index of each token's page
    k, v = page_tokens(store, layer, page[first])                            # [m, H, P, d]
    which, off = which.to(k.device), off.to(k.device)
    return k[which, :, off].transpose(0, 1), v[which, :, off].transpose(0, 1)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     window: int, scale: float, cap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense sliding-window attention (:func:`sphkv.attention.dense_attention` under the window's mask).

    ``q`` ``[n, Hq, d]``, ``k`` / ``v`` ``[Hkv, m, d]`` (GQA: ``Hq`` a multiple of ``Hkv``), ``q_pos`` ``[n]``,
    ``k_pos`` ``[m]`` absolute positions; key ``j`` is visible to query ``i`` iff
    ``0 <= q_pos[i] - k_pos[j] <= window``; ``cap > 0`` soft-caps the scaled logits. Returns
    ``o`` ``[n, Hq, dv]`` float32 (zeros where nothing is visible) and ``lse`` ``[n, Hq]`` float32
    (natural log; ``-inf`` where nothing is visible).
    """
    dist = q_pos.to(q.device)[:, None] - k_pos.to(q.device)[None, :]
    return dense_attention(q, k, v, scale=scale, visible=(dist >= 0) & (dist <= window), cap=cap)


class SlidingWindowAttention:
    """The sliding-window part of :class:`~sphkv_sglang.backend.SphKVAttnBackend` (see the module doc).

    ``reset(forward_batch)`` once per forward (from ``init_forward_metadata``), then ``forward(...)`` for
    each sliding layer; plans are built lazily on the first sliding layer of a forward, one per window.
    """

    def __init__(self, backend):
        self.backend = backend
        self._wrappers: dict[int, BatchPrefillWithSphKVPagedKVCacheWrapper] = {}
        self._fb = None
        self._plans: dict[int, dict] = {}
        self._slots: torch.Tensor | None = None

    def reset(self, forward_batch) -> None:
        self._fb = forward_batch
        self._plans = {}
        self._slots = None

    def _slot_rows(self) -> torch.Tensor:
        if self._slots is None:
            fb = self._fb
            self._slots = self.backend.req_to_token_pool.req_to_token[fb.req_pool_indices].to("cpu", torch.int64)
        return self._slots

    def _wrapper(self, window: int) -> BatchPrefillWithSphKVPagedKVCacheWrapper:
        if window not in self._wrappers:
            self._wrappers[window] = BatchPrefillWithSphKVPagedKVCacheWrapper(
                tiers=self.backend.store.wrapper_tiers, backend=self.backend.wrapper_backend)
        return self._wrappers[window]

    # -- decode -------------------------------------------------------------------------------------------
    def _decode_plan(self, window: int) -> dict:
        """Wrapper plan over the pages wholly inside each request's window + the head pages' token ranges."""
        if window in self._plans:
            return self._plans[window]
        be, st, fb = self.backend, self.backend.store, self._fb
        P = st.P
        slots = self._slot_rows()
        lens = fb.seq_lens.to("cpu", torch.int64)
        s = window_start(lens, window)
        base = torch.minimum((s + P - 1) // P * P, lens)                      # first token of the wholly-inside pages
        n_in = lens - base
        width = max(int(n_in.max()) if n_in.numel() else 0, 1)
        idx = (base[:, None] + torch.arange(width)[None, :]).clamp_max(slots.shape[1] - 1)
        rows = (s < base).nonzero().flatten()                                 # requests with head-page tokens
        first = slots[rows, s[rows]]                                          # slot of each one's first visible token
        plan = {"wrapper": None, "head": None if rows.numel() == 0 else
                dict(rows=rows, pages=first // P, off=first % P, count=(base - s)[rows])}
        if int(n_in.max()) > 0:
            pp = st.plan_pages(slots.gather(1, idx), n_in)
            w = self._wrapper(window)
            w.plan(torch.arange(lens.numel() + 1), pp["indptr"], pp["indices"], pp["page_tiers"], None,
                   be.num_q_heads, st.H, st.d, P, page_lens=pp["page_lens"], device=be.device)
            plan["wrapper"] = w
        plan["lens"] = lens
        self._plans[window] = plan
        return plan

    def _decode(self, q3, layer, local, cap):
        st = self.backend.store
        window = int(layer.sliding_window_size)
        plan = self._decode_plan(window)
        n, hq = q3.shape[0], q3.shape[1]
        if plan["wrapper"] is not None:
            o, lse = plan["wrapper"].run(q3, st.layer_cache(local), sm_scale=layer.scaling, logits_soft_cap=cap,
                                         return_lse=True)
        else:
            o = torch.zeros(n, hq, layer.v_head_dim, dtype=torch.float32, device=q3.device)
            lse = torch.full((n, hq), float("-inf"), dtype=torch.float32, device=q3.device)
        hd = plan["head"]
        if hd is not None:                                                    # all head pages at once
            k, v = page_tokens(st, local, hd["pages"])                        # [m, H, P, d]
            m, h = k.shape[0], k.shape[1]
            g = hq // h
            rows = hd["rows"].to(q3.device)
            qh = q3[rows].float().view(m, h, g, -1)                           # [m, H, G, d]
            sc = (qh @ k.transpose(-1, -2)) * layer.scaling                   # [m, H, G, P]
            if cap > 0:
                sc = cap * torch.tanh(sc / cap)
            j = torch.arange(st.P, device=sc.device)[None, :]
            off, cnt = hd["off"].to(sc.device)[:, None], hd["count"].to(sc.device)[:, None]
            vis = (j >= off) & (j < off + cnt)                                # the head page's visible tokens
            oh, lh = attention_state(sc.masked_fill(~vis[:, None, None, :], float("-inf")), v)   # [m, H, G, dv]
            o[rows], lse[rows] = merge_state(o[rows], lse[rows], oh.reshape(m, hq, -1).to(o.device),
                                             lh.reshape(m, hq).to(o.device))
        return o

    # -- extend -------------------------------------------------------------------------------------------
    def _extend(self, q3, k3, v3, layer, local, plan, cap):
        st, fb = self.backend.store, self._fb
        window = int(layer.sliding_window_size)
        seq = fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens.cpu()
        prefix = seq.to(torch.int64) - torch.tensor(plan.q_lens, dtype=torch.int64)
        out = torch.empty(q3.shape[0], q3.shape[1], layer.v_head_dim, dtype=q3.dtype, device=q3.device)
        for b, (s, n) in enumerate(zip(plan.q_starts, plan.q_lens)):
            if n == 0:
                continue
            p0 = int(prefix[b])
            c0 = max(0, p0 - window)                                          # first cached key any new query sees
            if c0 < p0:
                ck, cv = dense_tokens(st, local, self._slot_rows()[b], c0, p0)     # [H, p0 - c0, d]
            else:
                ck = cv = None
            for a in range(0, n, BLOCK):
                e = min(n, a + BLOCK)
                lo = max(0, p0 + a - window)                                   # first key of this block
                parts_k, parts_v = [], []
                if ck is not None and lo < p0:
                    parts_k.append(ck[:, lo - c0:])
                    parts_v.append(cv[:, lo - c0:])
                nlo = max(lo, p0) - p0                                         # first new token read
                parts_k.append(k3[s + nlo:s + e].transpose(0, 1).float())
                parts_v.append(v3[s + nlo:s + e].transpose(0, 1).float())
                k_pos = torch.arange(lo, p0 + e)
                o, _ = window_attention(q3[s + a:s + e], torch.cat(parts_k, 1), torch.cat(parts_v, 1),
                                        torch.arange(p0 + a, p0 + e), k_pos, window, layer.scaling, cap)
                out[s + a:s + e] = o.to(out.dtype)
        return out

    # -- entry point --------------------------------------------------------------------------------------
    def forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool):
        """The sliding layer's output ``[rows, Hq * dv]`` (same contract as the backend's ``_forward``)."""
        be = self.backend
        pool, plan = be.token_to_kv_pool, be.forward_metadata
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q3 = q.reshape(-1, hq, d)
        k3, v3 = k.reshape(-1, hkv, d), v.reshape(-1, hkv, layer.v_head_dim)
        rows, cap = q3.shape[0], float(layer.logit_cap or 0.0)
        local = layer.layer_id - pool.start_layer
        if plan.decode:
            if save_kv_cache:
                pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k3, v3)
            if not plan.has_prefix:
                return q.new_zeros(rows, hq * layer.v_head_dim)
            return self._decode(q3, layer, local, cap).to(q.dtype).reshape(rows, hq * layer.v_head_dim)
        out = self._extend(q3, k3, v3, layer, local, plan, cap)
        if save_kv_cache and k is not None and v is not None:
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k3, v3)
        return out.reshape(rows, hq * layer.v_head_dim)
