# SPDX-License-Identifier: Apache-2.0
"""The tiered, angle-coded KV store behind :class:`~sphkv_sglang.pool.SphKVPool` (no SGLang import).

Layout (``L`` layers, ``H`` KV heads, ``P`` tokens per page, ``d`` head_dim)::

    arenas[t][l]   sphkv.pool.TierPool of tier t, layer l, with phys_pages[t] * H pages;
                   viewed as [phys, H, P, ...] (page index = phys * H + head)
    k_stage/v_stage [L, S, H, P, d]  model dtype — dense staging slots (pages being filled)
    table          PageTable: logical page → staging slot or (tier, physical page)

Writes (one forward = the same ``loc`` for every layer, first layer first): the first layer stages
the partially written pages (a page written whole by this forward is coded straight from the new
K/V and never staged) and decides which pages became full and where they go (the most precise tier
with room; if it is full, cold pages named by the demotion source — the radix cache — are
re-encoded one tier down first); every layer writes its staged tokens densely and codes the full
pages of its own layer; the last layer frees their staging slots. Readers use the staging copy
while a page has one, so a page completed in this forward is read densely by all its layers; a
page written whole by this forward belongs to no request's prefix yet.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from sphkv.keys import AngleKeyCodec
from sphkv.pages.arenas import TIER_KINDS
from sphkv.pool import TierPool
from sphkv.tiers import Tier
from sphkv.validation import check_finite
from sphkv.values import GroupValueQuantizer

from .config import SphKVServeConfig
from .page_table import PageTable, PageTableError

__all__ = ["SphKVStore", "plan_phys_pages"]

logger = logging.getLogger(__name__)

_ADA = TIER_KINDS["ada"]        # how a coded arena's pages are decoded (shared with sphkv.pages.PagedStore)
DemotionSource = Callable[[int, int], list]      # (tier, num_pages) -> coldest demotable logical pages


def plan_phys_pages(cfg: SphKVServeConfig, *, num_pages: int, num_layers: int, num_kv_heads: int,
                    head_dim: int) -> tuple[int, ...]:
    """Physical pages per tier so that ``Σ phys ≥ num_pages`` and bytes follow ``cfg.fractions``."""
    dims = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
    coded = num_pages * cfg.cell_size(**dims) * cfg.page_size
    phys = [int(coded * f // cfg.page_bytes(t, **dims)) for t, f in zip(cfg.tiers, cfg.fractions)]
    phys[-1] += max(0, num_pages - sum(phys))
    return tuple(max(1, p) for p in phys)


def _cpu_encoders(tiers) -> list | None:
    """One ``flashinfer_ext.SphKVPageEncoder`` per coded tier on the C++ CPU encoder, or ``None`` (no compiler,
    ``SPHKV_CPU_KERNEL=0``: the codec's ``write_pages``)."""
    from sphkv_kernels.cpu_encode import available

    if not available():
        return None
    from flashinfer_ext import SphKVPageEncoder

    return [SphKVPageEncoder(t, backend="cpu") for t in tiers]


class SphKVStore:
    """Tiered angle-coded pages + dense staging for ``num_pages`` logical pages (page 0 = padding).

    Examples
    --------
    >>> cfg = SphKVServeConfig(page_size=8, max_running_requests=2)
    >>> st = SphKVStore(cfg, num_pages=9, num_layers=1, num_kv_heads=2, head_dim=64)
    >>> loc = torch.arange(8, 20)                     # page 1 (full) and half of page 2
    >>> st.write(0, loc, torch.randn(12, 2, 64), torch.randn(12, 2, 64))
    >>> plan = st.plan_pages(loc[None], torch.tensor([12]))    # per kv head: page 1 coded, page 2 staged
    >>> plan["page_tiers"].tolist(), plan["page_lens"].tolist()
    ([1, 0, 1, 0], [8, 4, 8, 4])
    """

    def __init__(self, cfg: SphKVServeConfig, *, num_pages: int, num_layers: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.bfloat16, device="cpu"):
        self.cfg, self.num_pages, self.num_layers = cfg, num_pages, num_layers
        self.H, self.d, self.P, self.dtype, self.device = num_kv_heads, head_dim, cfg.page_size, dtype, device
        self.phys_pages = plan_phys_pages(cfg, num_pages=num_pages, num_layers=num_layers,
                                          num_kv_heads=num_kv_heads, head_dim=head_dim)
        self.tiers = [Tier(n, cfg.codec_config(n, head_dim)) for n in cfg.tiers]
        self.kcodec = [AngleKeyCodec(t.config) for t in self.tiers]
        self.vquant = [GroupValueQuantizer(t.config) for t in self.tiers]
        self.arenas = [[TierPool(t, n * num_kv_heads, head_dim=head_dim, page_size=self.P, device=device)
                        for _ in range(num_layers)] for t, n in zip(self.tiers, self.phys_pages)]
        shape = (num_layers, cfg.num_staging_pages, num_kv_heads, self.P, head_dim)
        self.k_stage = torch.zeros(shape, dtype=dtype, device=device)
        self.v_stage = torch.zeros(shape, dtype=dtype, device=device)
        self.table = PageTable(num_pages=num_pages, phys_pages=self.phys_pages,
                               staging_pages=cfg.num_staging_pages, page_size=self.P)
        self.page_mass = torch.zeros(num_pages, dtype=torch.float32)
        self.demotion_source: DemotionSource | None = None
        self._encoders = _cpu_encoders(self.tiers) if torch.device(device).type == "cpu" else None
        self._layer_caches: dict[int, list] = {}
        self._plan = None
        self._static_reads: torch.Tensor | None = None      # [2] device-side read counts of static plans
        self._counters = dict(tokens_written=0, pages_coded=[0] * len(self.tiers), pages_demoted=0,
                              coded_pages_read=0, dense_tokens_read=0, pages_released=0, nonfinite_rows=0,
                              staging_high_water=0, pages_copied_on_write=0)

    @property
    def counters(self) -> dict:
        """Event counters (``stats()``); reading them folds in the read counts that static plans
        accumulated on the device (one host read here, none per forward)."""
        acc = self._static_reads
        if acc is not None:
            coded, dense = acc.tolist()
            acc.zero_()
            self._counters["coded_pages_read"] += coded
            self._counters["dense_tokens_read"] += dense
        return self._counters

    # -- views ---------------------------------------------------------------------------------------
    def _view(self, tier: int, layer: int, name: str) -> torch.Tensor:
        t = getattr(self.arenas[tier][layer], name)
        return t.view(self.phys_pages[tier], self.H, *t.shape[1:])

    # -- write -----------------------------------------------------------------------------------------
    def write(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` ``[N, H, d]`` of slots ``loc`` ``[N]`` for ``layer`` (0-based local index)."""
        if self._plan is None or (layer == 0 and not self._plan.pop("prebuilt", False)):
            self._plan = self._begin_forward(loc)
        plan = self._plan
        if plan["loc"].numel() != loc.numel() or (plan["loc"].data_ptr() != loc.data_ptr()
                                                  and not torch.equal(plan["loc"], loc.cpu())):
            raise PageTableError(f"layer {layer} writes other slots than layer 0 of this forward")
        sel = plan["sel"]                                     # None: every row is written (decode)
        kk, vv = k.reshape(-1, self.H, self.d), v.reshape(-1, self.H, self.d)
        if sel is not None:
            kk, vv = kk[sel], vv[sel]
        # one float32 sum per tensor is finite iff every element is (barring overflow, which only sends the
        # exact per-row check below looking): a sum reduction is far cheaper than isfinite().all() on bf16
        if not bool(torch.isfinite(kk.sum(dtype=torch.float32)) & torch.isfinite(vv.sum(dtype=torch.float32))):
            kk, nk = check_finite(kk, f"keys of layer {layer}", self.cfg.nonfinite)
            vv, nv = check_finite(vv, f"values of layer {layer}", self.cfg.nonfinite)
            self._counters["nonfinite_rows"] += nk + nv
        st = plan["staged"]
        if st is not None:
            # one index_copy_ per tensor into the flat [S * H * P, d] view: row (slot * H + h) * P + off
            ks, vs = (kk, vv) if st is True else (kk[st], vv[st])
            n = ks.shape[0] * self.H
            self.k_stage[layer].view(-1, self.d).index_copy_(0, plan["rows"], ks.reshape(n, self.d).to(self.dtype))
            self.v_stage[layer].view(-1, self.d).index_copy_(0, plan["rows"], vs.reshape(n, self.d).to(self.dtype))
        for tier, phys, src, idx in plan["full"]:
            if src == "stage":                                                   # [n, H, P, d]
                kd, vd = self.k_stage[layer, idx], self.v_stage[layer, idx]
            else:                                                                # rows [n, P] of this write
                kd, vd = kk[idx].transpose(1, 2), vv[idx].transpose(1, 2)
            self._store_coded(layer, tier, phys, kd, vd)
        if layer == self.num_layers - 1:
            if plan["pending"] is not None:
                self.table.finish_pending(plan["pending"])
            self._plan = None

    def begin_forward(self, loc: torch.Tensor) -> None:
        """Do the page bookkeeping of this forward's writes at ``loc`` ``[N]`` now (before any layer
        writes): stage the pages being written, mark them written, place the pages that become full.
        Decode plans its reads after this so the new tokens are read from their staging pages."""
        self._plan = self._begin_forward(loc)
        self._plan["prebuilt"] = True

    # -- batched read plan -------------------------------------------------------------------------
    @property
    def wrapper_tiers(self) -> tuple[Tier, ...]:
        """Tiers as the ``flashinfer_ext`` wrappers index them: 0 = dense staging, ``1 + t`` = coded tier ``t``."""
        return (Tier("staging"), *self.tiers)

    def layer_cache(self, layer: int) -> list:
        """``kv_cache`` of the wrappers for ``layer``: staging pages ``[S * H, P, d]`` (page id
        ``slot * H + head``), then each coded tier's arena (page id ``phys * H + head``)."""
        cache = self._layer_caches.get(layer)
        if cache is None:                      # views of tensors that live as long as the store: built once
            sp = self.k_stage.shape[1] * self.H
            dense = {"k": self.k_stage[layer].view(sp, self.P, self.d),
                     "v": self.v_stage[layer].view(sp, self.P, self.d)}
            cache = self._layer_caches[layer] = [dense, *(self.arenas[t][layer] for t in range(len(self.tiers)))]
        return cache

    def plan_pages(self, slots: torch.Tensor, lens: torch.Tensor) -> dict:
        """Page lists of a batch for the wrappers (vectorized; no per-request loop).

        Parameters
        ----------
        slots : ``[B, >= max(lens)]`` int — each request's token slots (SGLang's ``req_to_token`` rows).
        lens : ``[B]`` int — tokens to read per request (its first ``lens[b]`` slots).

        Returns
        -------
        dict with ``indptr`` ``[B * H + 1]`` int32 (row ``b * H + h``), ``indices`` ``[nnz]`` int32,
        ``page_tiers`` ``[nnz]`` int64 (see :attr:`wrapper_tiers`), ``page_lens`` ``[nnz]`` int32 and
        ``pages`` ``[nnz]`` int64 (logical page of every entry).
        """
        P, H = self.P, self.H
        lens = lens.to("cpu", torch.int64)
        b = lens.numel()
        npg = (lens + P - 1) // P
        maxp = int(npg.max()) if b else 0
        first = slots[:, : maxp * P: P].to("cpu", torch.int64)
        if first.shape[1] < maxp:
            raise PageTableError(f"slot rows hold {slots.shape[1]} tokens, fewer than max(lens)={int(lens.max())}")
        pages = first // P                                                   # [B, maxp]
        col = torch.arange(maxp)
        valid = col[None, :] < npg[:, None]
        pages = torch.where(valid, pages, torch.zeros_like(pages))
        stage = self.table.stage_of[pages].to(torch.int64)
        tier = self.table.tier_of[pages].to(torch.int64)
        lost = valid & (stage < 0) & (tier < 0)
        if bool(lost.any()):
            raise PageTableError(f"prefix page(s) {pages[lost].tolist()[:8]} are neither staged nor coded "
                                 "(read after free?)")
        staged = stage >= 0
        wtier = torch.where(staged, torch.zeros_like(tier), tier + 1)
        base = torch.where(staged, stage, self.table.phys_of[pages].to(torch.int64))
        plen = torch.where(col[None, :] == (npg - 1)[:, None], (lens - (npg - 1) * P)[:, None],
                           torch.full_like(pages, P))
        mask = valid[:, None, :].expand(b, H, maxp)
        heads = torch.arange(H)[None, :, None]
        ex = lambda t: t[:, None, :].expand(b, H, maxp)[mask]                # noqa: E731
        indices = (base[:, None, :] * H + heads)[mask]
        indptr = torch.zeros(b * H + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(npg.repeat_interleave(H), 0)
        n_coded = int((valid & ~staged).sum())
        self._counters["coded_pages_read"] += n_coded
        self._counters["dense_tokens_read"] += int(plen[valid & staged].sum())
        return dict(indptr=indptr.to(torch.int32), indices=indices.to(torch.int32), page_tiers=ex(wtier),
                    page_lens=ex(plen).to(torch.int32), pages=ex(pages))

    def plan_pages_static(self, slots: torch.Tensor, lens: torch.Tensor, max_pages: int,
                          out: dict | None = None) -> dict:
        """:meth:`plan_pages` with static shapes and no host synchronization (CUDA-graph friendly).

        Every row ``b * H + h`` owns exactly ``max_pages`` entries (``indptr = arange * max_pages``);
        entries past a request's last page have ``page_lens = 0`` (the kernels skip them), tier 0 and
        index 0. Everything is computed on ``slots``' device from device mirrors of the page table;
        no ``.item()`` / ``.tolist()`` / boolean-mask indexing, and no read-after-free check (that
        needs the host; the debug poison mode checks it through a :meth:`plan_pages` of the same
        prefix). The read counters (``coded_pages_read``, ``dense_tokens_read``) accumulate in a
        device tensor, folded into :attr:`counters` when they are read.

        Parameters
        ----------
        slots : ``[B, > (max_pages - 1) * P]`` int — SGLang's ``req_to_token`` rows of the batch.
        lens : ``[B]`` int — tokens to read per request; ``ceil(lens / P) <= max_pages`` is the caller's
            contract (the backend's decode: the longest request's pages, from ``seq_lens_cpu``; a
            CUDA graph would fix ``ceil(req_to_token.shape[1] / P)``).
        max_pages : entries per row.
        out : optional dict of preallocated tensors (the keys returned) written in place, so that
            their addresses stay fixed across forwards (graph replay).

        Returns
        -------
        dict with ``indptr`` ``[B * H + 1]`` int32, ``indices`` / ``page_lens`` ``[B * H * max_pages]``
        int32, ``page_tiers`` / ``pages`` ``[B * H * max_pages]`` int64.
        """
        P, H = self.P, self.H
        dev = slots.device
        b = slots.shape[0]
        if max_pages < 1 or slots.shape[1] < (max_pages - 1) * P + 1:
            raise PageTableError(f"max_pages={max_pages} must be >= 1 and slot rows ({slots.shape[1]} tokens) must "
                                 f"reach the first slot of page max_pages - 1 ({(max_pages - 1) * P})")
        stage_of, tier_of, phys_of = self._table_on(dev)
        lens = lens.to(device=dev, dtype=torch.int64)
        npg = (lens + P - 1) // P                                            # [B]
        col = torch.arange(max_pages, device=dev)
        valid = col[None, :] < npg[:, None]                                  # [B, M]
        pages = torch.where(valid, slots[:, : max_pages * P: P].to(torch.int64) // P, 0)
        stage = stage_of[pages].to(torch.int64)
        staged = stage >= 0
        wtier = torch.where(valid, torch.where(staged, 0, tier_of[pages].to(torch.int64) + 1), 0)
        base = torch.where(valid, torch.where(staged, stage, phys_of[pages].to(torch.int64)), 0)
        plen = torch.where(col[None, :] == (npg - 1)[:, None], (lens - (npg - 1) * P)[:, None], P)
        plen = torch.where(valid, plen, 0)
        reads = torch.stack([(valid & ~staged).sum(), torch.where(valid & staged, plen, 0).sum()])
        if self._static_reads is None or self._static_reads.device != reads.device:
            self._static_reads = torch.zeros(2, dtype=torch.int64, device=dev)
        self._static_reads.add_(reads)                                       # device-side: no host read
        heads = torch.arange(H, device=dev)[None, :, None]
        ex = lambda t: t[:, None, :].expand(b, H, max_pages).reshape(-1)     # noqa: E731
        res = dict(indptr=(torch.arange(b * H + 1, device=dev) * max_pages).to(torch.int32),
                   indices=torch.where(valid[:, None, :], base[:, None, :] * H + heads, 0).reshape(-1).to(torch.int32),
                   page_tiers=ex(wtier), page_lens=ex(plen).to(torch.int32), pages=ex(pages))
        if out is None:
            return res
        for k, v in res.items():
            out[k].copy_(v)
        return out

    def _table_on(self, dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``stage_of``, ``tier_of``, ``phys_of`` on ``dev`` (the CPU tables themselves on the CPU; a
        mirror refreshed by a non-blocking copy elsewhere)."""
        t = self.table
        if torch.device(dev).type == "cpu":
            return t.stage_of, t.tier_of, t.phys_of
        mir = getattr(self, "_table_mirror", None)
        if mir is None or mir[0].device != torch.device(dev):
            mir = self._table_mirror = tuple(torch.empty_like(x, device=dev) for x in (t.stage_of, t.tier_of,
                                                                                       t.phys_of))
        for m, x in zip(mir, (t.stage_of, t.tier_of, t.phys_of)):
            m.copy_(x, non_blocking=True)
        return mir

    def _begin_forward(self, loc: torch.Tensor) -> dict:
        """Stage partial pages, find full ones, place them; the plan every layer of this forward follows."""
        loc = loc.to("cpu", torch.int64)
        pages, offs = loc // self.P, loc % self.P
        sel = pages > 0                                                    # page 0 = padding writes
        pages, offs = pages[sel], offs[sel]
        uniq, counts = torch.unique(pages, return_counts=True)
        direct = uniq[(counts == self.P) & ~self.table.written[uniq].any(-1)]   # whole page in this write
        is_direct = torch.isin(pages, direct)
        self.table.stage(uniq[~torch.isin(uniq, direct)])
        self._counters["staging_high_water"] = max(self._counters["staging_high_water"],
                                                   self.table.num_staging - len(self.table.free_stage))
        full = self.table.mark_written(pages, offs)
        self._counters["tokens_written"] += int(pages.numel())
        pending = full[~torch.isin(full, direct)]
        dev = self.device
        staged = ~is_direct
        rows = torch.full((direct.numel(), self.P), -1, dtype=torch.int64)
        if direct.numel():
            rank = torch.searchsorted(direct, pages[is_direct])
            rows[rank, offs[is_direct]] = is_direct.nonzero().flatten()
        placed = []
        for tier, pgs, phys in self._place(full):
            in_direct = torch.isin(pgs, direct)
            if bool(in_direct.any()):
                r = rows[torch.searchsorted(direct, pgs[in_direct])]
                placed.append((tier, phys[in_direct], "rows", r.to(dev)))
            if bool((~in_direct).any()):
                placed.append((tier, phys[~in_direct], "stage", self.table.stage_of[pgs[~in_direct]].long().to(dev)))
        n_staged = int(staged.sum())
        slots = self.table.stage_of[pages[staged]].long()
        rows = ((slots[:, None] * self.H + torch.arange(self.H)) * self.P + offs[staged][:, None]).reshape(-1)
        return dict(loc=loc, sel=None if bool(sel.all()) else sel.to(dev),
                    staged=None if n_staged == 0 else (True if n_staged == staged.numel() else staged.to(dev)),
                    rows=rows.to(dev), full=placed, pending=pending if pending.numel() else None)

    def _place(self, full: torch.Tensor) -> list:
        """Assign each newly full page a physical page; returns ``[(tier, pages, phys), ...]``."""
        if full.numel() == 0:
            return []
        short = full.numel() - self.table.free_count(0)
        if short > 0 and len(self.tiers) > 1:
            self._demote_coldest(0, short)
        out: dict[int, list] = {}
        for p in full.tolist():
            tier = next((t for t in range(len(self.tiers)) if self.table.free_count(t)), None)
            if tier is None:
                raise PageTableError("no physical page left in any tier (pool sizing bug)")
            out.setdefault(tier, []).append((p, self.table.assign(p, tier=tier)))
            self._counters["pages_coded"][tier] += 1
        return [(t, torch.tensor([p for p, _ in v]), torch.tensor([f for _, f in v])) for t, v in out.items()]

    def _page_ids(self, phys: torch.Tensor) -> torch.Tensor:
        """Arena page ids ``phys * H + head`` of physical pages ``phys`` ``[n]`` → ``[n * H]`` (page-major)."""
        phys = phys.to(self.device, torch.int64)
        return (phys[:, None] * self.H + torch.arange(self.H, device=phys.device)).reshape(-1)

    def _store_coded(self, layer: int, tier: int, phys: torch.Tensor, kd: torch.Tensor, vd: torch.Tensor) -> None:
        """Code full pages ``kd``, ``vd`` ``[n, H, P, d]`` into physical pages ``phys`` ``[n]`` of ``tier``: on CPU
        through ``flashinfer_ext.SphKVPageEncoder`` (the C++ page encoder), elsewhere the arena's own
        ``write_pages`` (the codec)."""
        ids = self._page_ids(phys)
        enc = self._encoders[tier] if self._encoders else None
        if enc is None:
            self.arenas[tier][layer].write_pages(ids, kd.reshape(-1, self.d), vd.reshape(-1, self.d))
            return
        n = ids.numel()
        enc.encode(kd.reshape(n, self.P, self.d), vd.reshape(n, self.P, self.d), ids.to(torch.int32),
                   torch.full((n,), self.P, dtype=torch.int32), self.arenas[tier][layer])

    # -- copy-on-write of a shared page's prefix ----------------------------------------------------
    def copy_page_prefix(self, src_page: int, dst_page: int, count: int) -> None:
        """Copy the first ``count`` tokens (``0 < count < P``) of logical page ``src_page`` into the fresh
        logical page ``dst_page``, all layers, as a dense staging page (partial-page prefix reuse: a
        request whose cached prefix ends inside a shared page continues in its own copy, so the shared
        page is never written). The source's staging copy is taken when it has one, else its codes are
        decoded (those tokens are re-coded with the rest of ``dst_page`` when it fills)."""
        if not 0 < count < self.P:
            raise ValueError(f"count={count} must be in 1..{self.P - 1}")
        t = self.table
        if int(t.stage_of[dst_page]) >= 0 or int(t.tier_of[dst_page]) >= 0 or bool(t.written[dst_page].any()):
            raise PageTableError(f"copy target page {dst_page} is not a fresh page")
        src_slot, tier = int(t.stage_of[src_page]), int(t.tier_of[src_page])
        if src_slot < 0 and tier < 0:
            raise PageTableError(f"copy source page {src_page} is neither staged nor coded (read after free?)")
        t.stage(torch.tensor([dst_page]))
        dst = int(t.stage_of[dst_page])
        if src_slot >= 0:
            self.k_stage[:, dst, :, :count] = self.k_stage[:, src_slot, :, :count]
            self.v_stage[:, dst, :, :count] = self.v_stage[:, src_slot, :, :count]
        else:
            phys = t.phys_of[src_page].long().reshape(1).to(self.device)
            for layer in range(self.num_layers):
                kd, vd = self._decode(layer, tier, phys)                        # [1, H, P, d] float32
                self.k_stage[layer, dst, :, :count] = kd[0, :, :count].to(self.dtype)
                self.v_stage[layer, dst, :, :count] = vd[0, :, :count].to(self.dtype)
        t.mark_written(torch.full((count,), dst_page, dtype=torch.int64), torch.arange(count))
        self._counters["pages_copied_on_write"] += 1

    # -- demotion ------------------------------------------------------------------------------------
    def _demote_coldest(self, tier: int, num_pages: int) -> int:
        """Re-encode up to ``num_pages`` cold pages of ``tier`` one tier down; return how many moved."""
        if self.demotion_source is None or tier + 1 >= len(self.tiers):
            return 0
        victims = [p for p in self.demotion_source(tier, num_pages) if int(self.table.tier_of[p]) == tier]
        victims = victims[:num_pages]
        short = len(victims) - self.table.free_count(tier + 1)
        if short > 0:
            self._demote_coldest(tier + 1, short)
        victims = victims[:self.table.free_count(tier + 1)]
        if victims:
            self.demote(torch.tensor(victims), to_tier=tier + 1)
        return len(victims)

    def demote(self, pages: torch.Tensor, *, to_tier: int) -> None:
        """Re-encode coded ``pages`` (all in one tier) into ``to_tier``, all layers; frees their old pages."""
        moves = [self.table.move(int(p), tier=to_tier) for p in pages.tolist()]
        src = {m[0] for m in moves}
        if len(src) != 1 or next(iter(src)) >= to_tier:
            raise PageTableError(f"demote needs pages of one tier above {to_tier}, got tiers {sorted(src)}")
        old_t = moves[0][0]
        old = torch.tensor([m[1] for m in moves], device=self.device)
        new = torch.tensor([m[2] for m in moves])
        for layer in range(self.num_layers):
            kd, vd = self._decode(layer, old_t, old)
            self._store_coded(layer, to_tier, new, kd, vd)
        for m in moves:
            self.table.free_phys_page(m[0], m[1])
        self._counters["pages_demoted"] += len(moves)

    def _decode(self, layer: int, tier: int, phys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``[n, H, P, d]`` float32 keys and values of coded pages (demotion and copy-on-write, never
        attention)."""
        ids = self._page_ids(phys)
        shape = (phys.numel(), self.H, self.P, self.d)
        if self._encoders is not None:                 # CPU: the C++ page expansion (sphkv_kernels.cpu_decode)
            from sphkv_kernels.cpu_decode import coded_expand_cpu
            from sphkv_kernels.layout import CodedLayout

            k, v = coded_expand_cpu(self.arenas[tier][layer], ids, torch.full_like(ids, self.P),
                                    layout=CodedLayout.from_config(self.tiers[tier].config))
            return k.view(shape), v.view(shape)
        k, v = _ADA.decode(self.arenas[tier][layer], ids, torch.full_like(ids, self.P))     # [n * H * P, d]
        return k.view(shape), v.view(shape)

    # -- retention signal, free, accounting ---------------------------------------------------------
    def add_mass(self, pages: torch.Tensor, mass: torch.Tensor) -> None:
        """Accumulate attention mass ``[n]`` received by the tokens of logical ``pages`` ``[n]``."""
        self.page_mass.index_add_(0, pages.cpu(), mass.float().cpu())

    def release(self, pages: torch.Tensor) -> None:
        """SGLang freed ``pages`` (logical): drop their staging slots and physical pages."""
        pages = pages.to("cpu", torch.int64)
        self.table.release(pages)
        self.page_mass[pages[(pages > 0) & (pages < self.num_pages)]] = 0
        self._counters["pages_released"] += int(pages.numel())

    def reset(self) -> None:
        self.table.reset()
        self.page_mass.zero_()
        self._plan = None

    def nbytes(self) -> tuple[int, int]:
        """Allocated bytes ``(keys, values)``: arenas + staging (+ page tables, counted with keys)."""
        kb = vb = 0
        for per_layer in self.arenas:
            for a in per_layer:
                for name, t in a.tensors().items():
                    b = t.numel() * t.element_size()
                    kb, vb = (kb + b, vb) if name.startswith("k") else (kb, vb + b)
        st = self.k_stage.numel() * self.k_stage.element_size()
        tb = sum(t.numel() * t.element_size() for t in (self.table.tier_of, self.table.phys_of,
                                                          self.table.stage_of, self.table.written, self.page_mass))
        return kb + st + tb, vb + st

    def stats(self) -> dict:
        c = self.table.counts()
        return dict(tiers=list(self.cfg.tiers), page_size=self.P, phys_pages=list(self.phys_pages),
                    coded_pages=c["coded"], free_phys_pages=c["free_phys"], staging_in_use=c["staging"],
                    staging_pages=self.table.num_staging, kv_bytes=sum(self.nbytes()), **self.counters)
