# SPDX-License-Identifier: Apache-2.0
"""FlashInfer-style batch attention of new tokens over a paged, tiered cached prefix.

:class:`BatchPrefillWithSphKVPagedKVCacheWrapper` is what an engine calls for every forward: ``plan()``
once per batch (page lists per (request, kv head), tiers, valid lengths), ``run()`` per layer. Each
request has ``qo_len`` query tokens (1 in decode, the new tokens in extend); every query attends to
*all* the request's planned pages (they precede the new tokens). Attention among the new tokens
themselves is the caller's, merged with this result by log-sum-exp (``return_lse``), as FlashInfer's
cascade ``merge_state`` does.

Backends: ``"cpu"`` — the C++ page-tile kernels of :mod:`sphkv_kernels.cpu_decode` (many queries
per row share one expansion of each page); ``"triton"`` / ``"reference"`` — each query token becomes
one row of :class:`~flashinfer_ext.decode.BatchDecodeWithSphKVPagedKVCacheWrapper` (Triton decode
kernels on CUDA; the row's page list is repeated per token, so long extends over long prefixes are
slower there than a dedicated extend kernel would be). ``"auto"`` picks Triton on CUDA, else the CPU
kernels where they build, else the reference.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sphkv.attention import merge_state as merge_state      # FlashInfer's cascade merge, re-exported
from sphkv.tiers import Tier, TierSet
from sphkv_kernels.layout import CodedLayout
from sphkv_kernels.schedule import entry_page_lens

from .decode import BatchDecodeWithSphKVPagedKVCacheWrapper, _tier_tensors, resolve_backend

__all__ = ["BatchPrefillWithSphKVPagedKVCacheWrapper", "merge_state"]

_CODED_NAMES = ("k_codes", "k_radius", "k_mean", "v_codes", "v_scale", "v_zero")


class BatchPrefillWithSphKVPagedKVCacheWrapper:
    """Attention of ``qo_len`` query tokens per request over the request's tier pages.

    Parameters
    ----------
    tiers : the :class:`sphkv.tiers.TierSet` (or sequence of :class:`~sphkv.tiers.Tier`) indexed by
        ``page_tiers``; ``run``'s ``kv_cache[t]`` is tier ``t``'s :class:`sphkv.pool.TierPool` (or a
        mapping of its tensors).
    backend : ``"auto"`` | ``"cpu"`` | ``"triton"`` | ``"reference"``.
    workspace_buffer : optional uint8 scratch handed to the decode wrapper (non-CPU backends).

    Examples
    --------
    >>> from sphkv_kernels.testing import random_paged_cache
    >>> from sphkv.tiers import TierSet
    >>> ts = TierSet.default(head_dim=64, page_size=16)            # dense, sphkv-4, sphkv-2
    >>> c = random_paged_cache(ts.tiers, seq_lens=[40, 21], num_kv_heads=1, head_dim=64, page_size=16)
    >>> w = BatchPrefillWithSphKVPagedKVCacheWrapper(tiers=ts)
    >>> # 2 requests with 3 and 1 new tokens over their cached pages, 1 kv head, 2 query heads
    >>> w.plan(torch.tensor([0, 3, 4]), c.indptr, c.indices, c.page_tiers, c.last_page_len, 2, 1, 64, 16)
    >>> out, lse = w.run(torch.randn(4, 2, 64), c.pools, return_lse=True)
    >>> out.shape, lse.shape
    (torch.Size([4, 2, 64]), torch.Size([4, 2]))
    """

    def __init__(self, *, tiers: TierSet | Sequence[Tier], backend: str = "auto",
                 workspace_buffer: torch.Tensor | None = None):
        self._tiers = tuple(tiers.tiers if isinstance(tiers, TierSet) else tiers)
        if not self._tiers:
            raise ValueError("tiers must name at least one tier")
        if backend not in ("auto", "cpu", "triton", "reference"):
            raise ValueError(f"backend={backend!r}; allowed: 'auto', 'cpu', 'triton', 'reference'")
        self._layouts = [None if t.dense else CodedLayout.from_config(t.config) for t in self._tiers]
        self._backend_request = backend
        self._workspace = workspace_buffer
        self._decode: BatchDecodeWithSphKVPagedKVCacheWrapper | None = None
        self._plan = None

    # ---------------------------------------------------------------------------------------------
    def plan(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor, paged_kv_indices: torch.Tensor,
             page_tiers: torch.Tensor, paged_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int,
             head_dim: int, page_size: int, *, page_lens: torch.Tensor | None = None, device=None) -> None:
        """Plan one batch.

        Parameters
        ----------
        qo_indptr : ``[batch_size + 1]`` int — request ``b``'s queries are rows ``qo_indptr[b]:qo_indptr[b+1]`` of ``q``.
        paged_kv_indptr : ``[batch_size * num_kv_heads + 1]`` int — row ``r = b * num_kv_heads + h`` owns
            entries ``paged_kv_indptr[r]:paged_kv_indptr[r+1]``.
        paged_kv_indices : ``[nnz]`` int — page id of each entry in its tier's arena.
        page_tiers : ``[nnz]`` int — tier index of each entry.
        paged_kv_last_page_len : ``[batch_size * num_kv_heads]`` int — valid tokens of each row's last
            page (FlashInfer's convention); ignored when ``page_lens`` is given.
        page_lens : optional ``[nnz]`` int — valid tokens of every entry.
        device : where ``run`` computes (default: ``paged_kv_indices``' device).
        """
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads={num_qo_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        device = torch.device(device) if device is not None else paged_kv_indices.device
        backend = resolve_backend(self._backend_request, device)
        rows = paged_kv_indptr.numel() - 1
        batch = qo_indptr.numel() - 1
        if rows != batch * num_kv_heads:
            raise ValueError(f"paged_kv_indptr has {rows} rows; expected batch_size * num_kv_heads = "
                             f"{batch} * {num_kv_heads}")
        if page_lens is None:
            page_lens = entry_page_lens(paged_kv_indptr, paged_kv_last_page_len, page_size)
        qo_indptr = qo_indptr.to(device=device, dtype=torch.int64)
        common = dict(backend=backend, device=device, batch=batch, num_qo_heads=num_qo_heads,
                      num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size,
                      num_q=None)
        if backend != "cpu":
            self._plan = dict(common, **self._plan_rows(qo_indptr, paged_kv_indptr, paged_kv_indices, page_tiers,
                                                        page_lens, num_qo_heads, num_kv_heads, head_dim,
                                                        page_size, backend, device))
            return
        kv_indptr = paged_kv_indptr.to(device=device, dtype=torch.int64)
        tiers = page_tiers.to(device=device, dtype=torch.int64)
        counts = kv_indptr[1:] - kv_indptr[:-1]
        row_of = torch.repeat_interleave(torch.arange(rows, device=device), counts)
        num_t = len(self._tiers)
        key = tiers * rows + row_of
        order = torch.sort(key, stable=True).indices
        grp = torch.bincount(key, minlength=num_t * rows).view(num_t, rows)
        per_tier = grp.sum(1).tolist()                     # host values: the CPU backend only
        r_all = torch.arange(rows, device=device)
        b_of, h_of = r_all // num_kv_heads, r_all % num_kv_heads
        q_start, q_len = qo_indptr[:-1][b_of], (qo_indptr[1:] - qo_indptr[:-1])[b_of]
        items, base = [], 0
        ids = paged_kv_indices.to(device=device, dtype=torch.int32)
        lens = page_lens.to(device=device, dtype=torch.int32)
        for t in range(num_t):
            n_t = per_tier[t]
            ent = order[base:base + n_t]
            base += n_t
            if n_t == 0:
                items.append(None)
                continue
            start = torch.cumsum(grp[t], 0) - grp[t]
            keep = (grp[t] > 0) & (q_len > 0)
            it = torch.stack([q_start, q_len, h_of, start, start + grp[t], torch.zeros_like(start)], 1)[keep]
            items.append((it.contiguous(), ids[ent].contiguous(), lens[ent].contiguous()))
        self._plan = dict(common, items=items, rotations=self._rotations(device))

    def _rotations(self, device):
        rot = []
        for lay in self._layouts:
            if lay is None:
                rot.append((None, None))
            else:
                c = lay.on(device)
                rot.append((c["key_rotation_t"], c["value_rotation"] if lay.value_rotate else None))
        return rot

    def _plan_rows(self, qo_indptr, kv_indptr, indices, page_tiers, page_lens, hq, hkv, d, p, backend, device):
        """Non-CPU backends: one decode row per (query token, kv head), the request's page list repeated."""
        if self._decode is None:
            ws = self._workspace if self._workspace is not None else torch.empty(1 << 24, dtype=torch.uint8,
                                                                                 device=device)
            self._decode = BatchDecodeWithSphKVPagedKVCacheWrapper(ws, tiers=self._tiers, backend=backend)
        kv_indptr = kv_indptr.to(device=device, dtype=torch.int64)
        q_len = qo_indptr[1:] - qo_indptr[:-1]                                  # [B]
        rows = kv_indptr.numel() - 1
        row_len = kv_indptr[1:] - kv_indptr[:-1]                                # [B * Hkv]
        rep = torch.repeat_interleave(q_len, hkv)                               # tokens per row
        # new rows: for each request b, token i, head h -> source row b*hkv + h
        b_of_tok = torch.repeat_interleave(torch.arange(q_len.numel(), device=device), q_len)
        src_rows = (b_of_tok[:, None] * hkv + torch.arange(hkv, device=device)).reshape(-1)
        new_len = row_len[src_rows]
        new_indptr = torch.cat([new_len.new_zeros(1), torch.cumsum(new_len, 0)])
        ent = torch.repeat_interleave(kv_indptr[:-1][src_rows], new_len) + (
            torch.arange(int(new_indptr[-1]), device=device) - torch.repeat_interleave(new_indptr[:-1], new_len))
        del rep, rows
        self._decode.plan(new_indptr.to(torch.int32), indices.to(device)[ent].to(torch.int32),
                          page_tiers.to(device)[ent], torch.ones(src_rows.numel(), dtype=torch.int32, device=device),
                          hq, hkv, d, p, page_lens=page_lens.to(device)[ent].to(torch.int32), device=device)
        return dict(num_q=int(q_len.sum()))

    # ---------------------------------------------------------------------------------------------
    def run(self, q: torch.Tensor, kv_cache: Sequence, *, sm_scale: float | None = None,
            logits_soft_cap: float = 0.0, return_lse: bool = False):
        """Attention of ``q`` ``[num_q, num_qo_heads, head_dim]`` over the planned pages of one layer.

        ``kv_cache[t]``: tier ``t``'s :class:`sphkv.pool.TierPool` of this layer or a mapping of its
        tensors (``k``, ``v`` for a dense tier). ``logits_soft_cap`` ``c > 0`` replaces every scaled
        logit ``s`` by ``c * tanh(s / c)`` (CPU backend; SGLang knows the cap per layer). Returns ``out`` ``[num_q, num_qo_heads, head_dim]``
        float32 (zeros and ``lse = -inf`` for queries without pages) and, with ``return_lse``, the
        natural-log log-sum-exp ``[num_q, num_qo_heads]`` float32.
        """
        pl = self._plan
        if pl is None:
            raise RuntimeError("call plan() before run()")
        d = pl["head_dim"]
        scale = float(sm_scale) if sm_scale is not None else d ** -0.5
        if len(kv_cache) != len(self._tiers):
            raise ValueError(f"kv_cache has {len(kv_cache)} tiers; the wrapper has {len(self._tiers)}")
        if pl["backend"] != "cpu":
            if logits_soft_cap > 0:
                raise NotImplementedError("logits_soft_cap needs the CPU backend (the Triton decode kernels have none)")
            out = torch.empty(q.shape[0], q.shape[1], d, dtype=torch.float32, device=q.device)
            out, lse = self._decode.run(q, kv_cache, sm_scale=scale, out=out, return_lse=True)
            return (out, lse) if return_lse else out
        from sphkv_kernels import cpu_decode as cpu

        # One float32 state (out, log2-lse) merged in place by every tier's kernel call: no per-tier
        # temporaries and no merge arithmetic in Python (per-layer overhead is what decode pays most).
        n, hq = q.shape[0], q.shape[1]
        qf = q.to(torch.float32).contiguous()
        out = torch.zeros(n, hq, d)
        lse = torch.full((n, hq), float("-inf"))
        qrot = {}
        for t, entry in enumerate(pl["items"]):
            if entry is None:
                continue
            items, ids, lens = entry
            lay = self._layouts[t]
            if lay is None:
                c = _tier_tensors(kv_cache[t], True)
                cpu.dense_prefix_attention_cpu(qf, c["k"], c["v"], items, ids, lens, out, lse,
                                               num_kv_heads=pl["num_kv_heads"], sm_scale=scale,
                                               soft_cap=logits_soft_cap, merge=True)
            else:
                rk, rv = pl["rotations"][t]
                key = rk.data_ptr()
                if key not in qrot:
                    qrot[key] = (qf @ rk).contiguous()
                c = _tier_tensors(kv_cache[t], False)
                cpu.coded_prefix_attention_cpu(qrot[key], *(c[k] for k in _CODED_NAMES), items, ids, lens, out, lse,
                                               layout=lay, num_kv_heads=pl["num_kv_heads"], sm_scale=scale,
                                               soft_cap=logits_soft_cap, merge=True, value_rotation=rv)
        if not return_lse:
            return out
        return out, lse * math.log(2.0)
