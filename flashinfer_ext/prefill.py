# SPDX-License-Identifier: Apache-2.0
"""FlashInfer-style batch attention of new tokens over a paged, tiered cached prefix.

:class:`BatchPrefillWithSphKVPagedKVCacheWrapper` is what an engine calls for every forward: ``plan()``
once per batch (page lists per (request, kv head), tiers, valid lengths), ``run()`` per layer. Each
request has ``qo_len`` query tokens (1 in decode, the new tokens in extend); every query attends to
*all* the request's planned pages (they precede the new tokens). Attention among the new tokens
themselves is the caller's, merged with this result by log-sum-exp (``return_lse``), as FlashInfer's
cascade ``merge_state`` does.

Backends: ``"cpu"`` — the C++ page-tile kernels of :mod:`sphkv_kernels.cpu_decode` (many queries
per row share one expansion of each page); ``"triton"`` / ``"reference"`` — two routes, picked by
``plan(..., kernel_options={"extend": ...})``:

* ``"auto"`` (default, :data:`DEFAULT_EXTEND`): ``"tiles"`` on CUDA when some request of the batch has at least
  :data:`TILES_MIN_NEW_TOKENS` new tokens (an extend), else ``"rows"`` (a decode batch: one token per request, where
  the decode kernels are the fast path; also every CPU/interpreter plan);
* ``"rows"``: each query token becomes one row of
  :class:`~flashinfer_ext.decode.BatchDecodeWithSphKVPagedKVCacheWrapper` (the row's page list repeated per token:
  every prefix key is decoded once per (new token, kv head); H200 run 10: 130.5 ms for 4K new tokens over a 32K
  coded prefix vs FlashInfer's paged prefill 6.72 ms);
* ``"tiles"``: :mod:`sphkv_kernels.extend_tiles` — one program per (request, kv head, page range, block of new
  tokens) expands each coded key tile once and multiplies it by the block's ``block_m`` query rows (new tokens x GQA
  group) on tensor cores; the per-token states are merged by the decode merge. A coded tier the tensor-core kernel
  cannot read runs as per-token decode items of the row-wise/tile kernels (logged), a layout without any kernel
  through the reference (logged). H200 run 11: 83.9 ms vs rows 129.7 ms (1 x 4K new over 32K) and 645.8 vs 1,070.7 ms
  (8 x), max |diff| vs the extend reference 8.4e-3 (rows 6.3e-3); FlashInfer's paged bf16 prefill 6.6 / 50.8 ms.

``"auto"`` picks Triton on CUDA, else the CPU kernels where they build, else the reference.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch

from sphkv.attention import merge_state as merge_state      # FlashInfer's cascade merge, re-exported
from sphkv.tiers import Tier, TierSet
from sphkv_kernels import decode as kd
from sphkv_kernels.extend_tiles import extend_pages_per_split, schedule_extend
from sphkv_kernels.layout import KERNEL_HEAD_DIMS, CodedLayout
from sphkv_kernels.schedule import entry_page_lens

from .decode import BatchDecodeWithSphKVPagedKVCacheWrapper, _tier_tensors, _value_rotations, resolve_backend

__all__ = ["BatchPrefillWithSphKVPagedKVCacheWrapper", "merge_state", "DEFAULT_EXTEND", "TILES_MIN_NEW_TOKENS"]

_CODED_NAMES = ("k_codes", "k_radius", "k_mean", "v_codes", "v_scale", "v_zero")
# the Triton/reference route of ``plan(..., kernel_options={"extend": ...})`` when not given: "auto" = "tiles" (one
# key-tile expansion per block of new tokens; H200 run 11: 1.55x faster than "rows" at 1 x 4K new over a 32K prefix,
# 1.66x at 8 x) on CUDA when a request has >= TILES_MIN_NEW_TOKENS new tokens, else "rows" (decode rows)
DEFAULT_EXTEND = os.environ.get("SPHKV_EXTEND", "auto")
_EXTEND_ROUTES = ("auto", "rows", "tiles")
# "auto": the fewest new tokens of the batch's longest request for "tiles" (a tiles program expands a key tile once for
# block_m // group tokens, 16 at Llama's group 4; run 11: one such expansion costs about 10 decode rows' work)
TILES_MIN_NEW_TOKENS = int(os.environ.get("SPHKV_TILES_MIN_NEW_TOKENS", "16"))
# "tiles": query rows per program (new tokens x GQA group) up to head_dim 128. H200 run 12, 1 x 4K new over a 32K
# prefix, prefix part alone: block_m 64 / 8 warps 83.5 ms, 64 / 4 warps 61.0, **128 / 8 warps 45.4**, 128 / 16 warps
# 117.8, 256 / 16 warps 71.7 (block_n 32: slower everywhere). Above head_dim 128: 64 (registers; not timed)
TILES_BLOCK_M = 128
_TILE_OPTIONS = ("extend", "block_m", "block_n", "num_warps", "num_stages", "pages_per_split", "programs_per_sm",
                 "profile", "flash", "cascade")
# tiles route, tier kernels: the Triton launchers or their pure-PyTorch references (same signatures)
_LAUNCHERS = {
    "triton": (kd.coded_decode_partial, kd.dense_decode_partial, kd.merge_partials),
    "reference": (kd.coded_decode_partial_reference, kd.dense_decode_partial_reference, kd.merge_partials_reference),
}


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
             head_dim: int, page_size: int, *, page_lens: torch.Tensor | None = None, device=None,
             kernel_options: Mapping | None = None) -> None:
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
        kernel_options : Triton/reference backends: ``extend`` — ``"rows"`` (one decode row per new token, the
            decode wrapper), ``"tiles"`` (:mod:`sphkv_kernels.extend_tiles`) or ``"auto"`` (tiles on CUDA when a
            request has >= :data:`TILES_MIN_NEW_TOKENS` new tokens, else rows; default :data:`DEFAULT_EXTEND`);
            for ``"tiles"``: ``block_m`` (query rows per program, new tokens x GQA group, a power of two >= 16,
            default :data:`TILES_BLOCK_M` up to head_dim 128, else 64), ``block_n`` (keys per tile), ``num_warps`` (default 8), ``num_stages``,
            ``pages_per_split`` (default: split-K only while the token blocks leave the GPU short of
            ``programs_per_sm`` (default 4) programs per SM; the interpreter: no split); ``profile`` (timing
            diagnostics of the tensor-core kernel, the output is then wrong: 1 leaves the key expansion out, 2 the
            value unpacking, 3 both; :func:`sphkv_kernels.decode.coded_decode_partial`). CPU backend: ``flash`` —
            the extend route of :func:`sphkv_kernels.cpu_decode.coded_prefix_attention_cpu` (``"bfloat16"``,
            ``"float32"`` or ``"off"``; default :data:`sphkv_kernels.cpu_decode.FLASH`); ``cascade`` — requests
            that share leading pages read them once, all their queries as rows of one item
            (:mod:`sphkv_kernels.cpu_cascade`; default ``True``).
        """
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads={num_qo_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        kopt = dict(kernel_options or {})
        bad = sorted(set(kopt) - set(_TILE_OPTIONS))
        if bad:
            raise ValueError(f"kernel_options {bad} unknown; allowed: {_TILE_OPTIONS}")
        route = str(kopt.get("extend", DEFAULT_EXTEND))
        if route not in _EXTEND_ROUTES:
            raise ValueError(f"kernel_options['extend']={route!r}; allowed: {_EXTEND_ROUTES}")
        device = torch.device(device) if device is not None else paged_kv_indices.device
        backend = resolve_backend(self._backend_request, device)
        if route == "auto":
            route = "rows"
            if backend == "triton" and device.type == "cuda" and qo_indptr.numel() > 1:
                # the longest request's new tokens: host values where the engine plans (SGLang: CPU tensors)
                longest = int((qo_indptr[1:] - qo_indptr[:-1]).max())
                route = "tiles" if longest >= TILES_MIN_NEW_TOKENS else "rows"
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
        if backend != "cpu" and route == "tiles":
            self._plan = dict(common, route="tiles", **self._plan_tiles(
                qo_indptr, paged_kv_indptr, paged_kv_indices, page_tiers, page_lens, num_qo_heads, num_kv_heads,
                head_dim, page_size, backend, device, kopt))
            return
        if backend != "cpu":
            if device.type == "cuda":
                kd._warn_once(("extend-rows",),
                              "sphkv extend: the prefix part runs as one decode row per (new token, kv head) "
                              "(kernel_options extend='rows': every prefix key decoded once per new token); "
                              "extend='tiles' decodes each key tile once per block of new tokens")
            self._plan = dict(common, route="rows", **self._plan_rows(
                qo_indptr, paged_kv_indptr, paged_kv_indices, page_tiers, page_lens, num_qo_heads, num_kv_heads,
                head_dim, page_size, backend, device))
            return
        from sphkv_kernels.cpu_cascade import cpu_items

        # per tier, passes of CPU-kernel items; requests sharing leading pages read them once (cascade)
        items = cpu_items(qo_indptr, paged_kv_indptr, paged_kv_indices, page_tiers, page_lens,
                          num_kv_heads=num_kv_heads, num_tiers=len(self._tiers),
                          cascade=bool(kopt.get("cascade", True)))
        flash = kopt.get("flash")
        if flash is not None:
            from sphkv_kernels.cpu_decode import _flash_code

            _flash_code(str(flash))                           # a clear error now, not at run()
        self._plan = dict(common, items=items, rotations=self._rotations(device), flash=flash)

    def _rotations(self, device):
        rot = []
        for lay in self._layouts:
            if lay is None:
                rot.append((None, None))
            else:
                c = lay.on(device)
                rot.append((c["key_rotation_t"], c["value_rotation"] if lay.value_rotate else None))
        return rot

    def _plan_tiles(self, qo_indptr, kv_indptr, indices, page_tiers, page_lens, hq, hkv, d, p, backend, device,
                    kopt):
        """Triton/reference backends, ``extend="tiles"``: the :class:`~sphkv_kernels.extend_tiles.ExtendSchedule`,
        each present tier's route and the partial-state buffers."""
        g = hq // hkv
        block_m = int(kopt.get("block_m", 0)) or max(TILES_BLOCK_M if d <= 128 else 64, 1 << (g - 1).bit_length())
        if block_m < 16 or block_m & (block_m - 1) or block_m < g:
            raise ValueError(f"kernel_options['block_m']={block_m} must be a power of two >= 16 and >= the "
                             f"GQA group {g}")
        for t, lay in zip(self._tiers, self._layouts):
            if lay is not None and (lay.head_dim, lay.page_size) != (d, p):
                raise ValueError(f"tier {t.name!r} has head_dim/page_size {lay.head_dim}/{lay.page_size}, "
                                 f"the plan {d}/{p}")
        tpb = block_m // g
        pps = int(kopt.get("pages_per_split", 0))
        if pps < 1:
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
            pps = extend_pages_per_split(qo_indptr, kv_indptr, num_kv_heads=hkv, tokens_per_block=tpb,
                                         target_programs=int(kopt.get("programs_per_sm", 0) or 4) * sms)
        sched = schedule_extend(qo_indptr, kv_indptr, page_tiers, indices, page_lens, num_kv_heads=hkv,
                                num_tiers=len(self._tiers), pages_per_split=pps, tokens_per_block=tpb, device=device)
        interp = device.type != "cuda"
        kernel_ok = backend == "triton" and (d >= 32 if interp else d in KERNEL_HEAD_DIMS) and p >= 16
        present = [t for t in range(len(self._tiers)) if sched.tiers[t].num_items > 0]
        routes, items = {}, {}
        for t in present:
            lay, tw = self._layouts[t], sched.tiers[t]
            compiles = lay is None or (lay.kernel_compiles if interp else lay.kernel_supported)
            if not (kernel_ok and compiles):
                routes[t] = "reference"
            elif lay is None or kd.tc_supported(lay, g):
                routes[t] = "tiles"
            else:
                routes[t] = "token-rows"
            if routes[t] == "token-rows" or (routes[t] == "reference" and backend == "triton"):
                kd._warn_once(("extend", routes[t], t, d, p, g),
                              f"sphkv extend (tiles): tier {self._tiers[t].name!r} (head_dim={d}, page_size={p}, "
                              f"group={g}) " + ("is not read by the tensor-core kernel; per-token decode items of "
                                                "the row-wise/tile kernel (slower)" if routes[t] == "token-rows"
                                                else "has no Triton kernel here; the pure-PyTorch reference (slow)"))
            if routes[t] == "tiles":
                items[t] = (tw.work, tw.ext)
            else:                                   # per-token decode items (also what the reference launchers get)
                items[t] = (kd.expand_extend_items(tw.work, tw.ext, hkv), None)
        merge_backend = "triton" if kernel_ok else "reference"
        part_o = torch.empty(sched.num_slots, g, d, dtype=torch.float32, device=device)
        part_lse = torch.empty(sched.num_slots, g, dtype=torch.float32, device=device)
        rot, mask = _value_rotations(self._layouts, d, device)
        # the coded tiers' value rotation: inside the Triton merge up to head_dim 128, else on the tier's partial
        # states first (the merge's [d, d] operand exceeds shared memory above 128; see the decode wrapper)
        pre_rot = []
        if merge_backend == "triton" and d > 128 and not interp and mask:
            for t in present:
                if (mask >> t) & 1:
                    w = kd.expand_extend_items(*items[t], hkv) if items[t][1] is not None else items[t][0]
                    pre_rot.append((w[:, 3].to(torch.int64), rot[t]))
            mask = 0
        launch = {k: int(kopt[k]) for k in ("block_n", "num_warps", "num_stages") if int(kopt.get(k, 0) or 0) > 0}
        launch.setdefault("num_warps", 8)    # offline sm_90 compile, d = 128, block_m 64: 4 warps spill 496 B, 8: 32 B
        profile = int(kopt.get("profile", 0) or 0)  # timing diagnostics of the coded tc kernel only: the output is wrong
        if profile not in (0, 1, 2, 3):
            raise ValueError(f"kernel_options['profile']={profile} must be 0 (off), 1, 2 or 3")
        key_rot = {t: self._layouts[t].on(device)["key_rotation_t"] for t in present if self._layouts[t] is not None}
        return dict(sched=sched, routes=routes, items=items, block_m=block_m, present=present, key_rot=key_rot,
                    merge_backend=merge_backend, part_o=part_o, part_lse=part_lse,
                    rotations=torch.stack(rot).contiguous(), rotate_mask=mask, pre_rot=pre_rot, launch=launch,
                    num_q=sched.num_q, pages_per_split=pps, profile=profile)

    def _run_tiles(self, q, kv_cache, scale, return_lse):
        pl = self._plan
        hq, hkv, d, n = pl["num_qo_heads"], pl["num_kv_heads"], pl["head_dim"], pl["num_q"]
        if q.shape != (n, hq, d):
            raise ValueError(f"q must be [{n}, {hq}, {d}] as planned, got {tuple(q.shape)}")
        sched, po, plse = pl["sched"], pl["part_o"], pl["part_lse"]
        qrot = {}
        for t in pl["present"]:
            tw, route, (work, ext) = sched.tiers[t], pl["routes"][t], pl["items"][t]
            coded_fn, dense_fn, _ = _LAUNCHERS["reference" if route == "reference" else "triton"]
            kw = dict(num_kv_heads=hkv, sm_scale=scale)
            if route == "tiles":
                kw.update(ext=ext, block_m=pl["block_m"], **pl["launch"])
            lay = self._layouts[t]
            if lay is None:
                c = _tier_tensors(kv_cache[t], True)
                dense_fn(q, c["k"], c["v"], work, tw.page_ids, tw.page_lens, po, plse, **kw)
                continue
            rk = pl["key_rot"][t]
            if rk.data_ptr() not in qrot:             # one rotated copy of q per distinct key rotation
                qrot[rk.data_ptr()] = (q.to(torch.float32) @ rk).contiguous()
            if route == "tiles":
                kw["kernel"] = "tc"
                if pl["profile"]:
                    kw["profile"] = pl["profile"]
            c = _tier_tensors(kv_cache[t], False)
            coded_fn(qrot[rk.data_ptr()], *(c[k] for k in _CODED_NAMES), work, tw.page_ids, tw.page_lens, po, plse,
                     layout=lay, **kw)
        for slots, r in pl["pre_rot"]:
            po.index_copy_(0, slots, torch.matmul(po.index_select(0, slots), r))
        out = torch.empty(n, hq, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(n, hq, dtype=torch.float32, device=q.device)
        _LAUNCHERS[pl["merge_backend"]][2](po, plse, sched.slot_ptr, pl["rotations"], out, lse, num_kv_heads=hkv,
                                           rotate_mask=pl["rotate_mask"])
        return (out, lse) if return_lse else out

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
            if pl["route"] == "tiles":
                return self._run_tiles(q, kv_cache, scale, return_lse)
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
        for t, passes in enumerate(pl["items"]):
            for items, ids, lens in passes:
                lay = self._layouts[t]
                if lay is None:
                    c = _tier_tensors(kv_cache[t], True)
                    cpu.dense_prefix_attention_cpu(qf, c["k"], c["v"], items, ids, lens, out, lse,
                                                   num_kv_heads=pl["num_kv_heads"], sm_scale=scale,
                                                   soft_cap=logits_soft_cap, merge=True, flash=pl["flash"])
                else:
                    rk, rv = pl["rotations"][t]
                    key = rk.data_ptr()
                    if key not in qrot:
                        qrot[key] = (qf @ rk).contiguous()
                    c = _tier_tensors(kv_cache[t], False)
                    cpu.coded_prefix_attention_cpu(qrot[key], *(c[k] for k in _CODED_NAMES), items, ids, lens, out, lse,
                                                   layout=lay, num_kv_heads=pl["num_kv_heads"], sm_scale=scale,
                                                   soft_cap=logits_soft_cap, merge=True, value_rotation=rv,
                                                   flash=pl["flash"])
        if not return_lse:
            return out
        return out, lse * math.log(2.0)
