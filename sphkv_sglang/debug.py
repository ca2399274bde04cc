# SPDX-License-Identifier: Apache-2.0
"""Debug mode of the sphkv store: poison freed pages so a read after free fails loudly.

:func:`enable_poison` (or ``SPHKV_DEBUG_POISON=1`` in a server's environment, read by
:class:`~sphkv_sglang.pool.SphKVPool`) makes a :class:`~sphkv_sglang.store.SphKVStore`

* fill every physical page it frees (release, demotion, flush) with poison in every layer: key and
  value codes ``0xFF``, radii, page means, value scales and zero points NaN;
* fill every staging slot it frees with NaN when the next forward begins (its next staging or batch
  plan): the last layer's write frees the slots of the pages it completes, and that layer's attention
  still reads them in the same forward;
* check every prefix it hands to attention (every batch plan, :meth:`SphKVStore.plan_pages` and the
  decode plan :meth:`SphKVStore.plan_pages_static`, checked through a host-side plan): a NaN
  radius or staged token means the page table pointed at a freed page, and :class:`PoisonedReadError`
  is raised naming the layer and the logical pages.

It costs a few tensor fills per free and one NaN scan per read: for tests and load tests, not for
production serving.
"""
from __future__ import annotations

import os

import torch

from sphkv.pages.arenas import poison_page

from .page_table import PageTableError

__all__ = ["enable_poison", "PoisonedReadError", "ENV_POISON", "poison_requested"]

ENV_POISON = "SPHKV_DEBUG_POISON"


class PoisonedReadError(PageTableError):
    """Attention read a page (or staging slot) that had been freed."""


def poison_requested() -> bool:
    """True when ``$SPHKV_DEBUG_POISON`` is set to something other than ``""``/``0``."""
    return os.environ.get(ENV_POISON, "") not in ("", "0")


def _poison_phys(store, tier: int, phys: int | slice) -> None:
    """Poison physical page(s) ``phys`` of ``tier`` in every layer (arena pages ``phys * H + head``)."""
    rows = slice(None) if isinstance(phys, slice) else slice(phys * store.H, (phys + 1) * store.H)
    for layer in range(store.num_layers):
        poison_page(store.arenas[tier][layer], rows)


def _poison_stage(store, slots: list[int]) -> None:
    if slots:
        idx = torch.tensor(slots, dtype=torch.int64, device=store.k_stage.device)
        store.k_stage[:, idx] = float("nan")
        store.v_stage[:, idx] = float("nan")


def _check_plan(store, plan: dict, slots_lens) -> None:
    """Every planned entry of a batch (first and last layer): coded pages not poisoned, staged tokens finite."""
    pages, tiers, ids, lens = plan["pages"], plan["page_tiers"], plan["indices"].long(), plan["page_lens"].long()
    if pages.numel() == 0:
        return
    h = store.H
    for layer in sorted({0, store.num_layers - 1}):
        bad = torch.zeros(pages.numel(), dtype=torch.bool)
        for t in range(len(store.tiers)):
            sel = (tiers == t + 1).nonzero().flatten()
            if sel.numel():
                rad = store.arenas[t][layer].k_radius[ids[sel].to(store.arenas[t][layer].k_radius.device)]
                bad[sel] = torch.isnan(rad.float()).any(-1).cpu()
        sel = (tiers == 0).nonzero().flatten()
        if sel.numel():
            k = store.k_stage[layer].reshape(-1, store.P, store.d)[ids[sel].to(store.k_stage.device)]   # [m, P, d]
            valid = torch.arange(store.P)[None, :] < lens[sel][:, None]
            bad[sel] = (torch.isnan(k.float()).any(-1).cpu() & valid).any(-1)
        if bool(bad.any()):
            raise PoisonedReadError(f"layer {layer}: page(s) {sorted(set(pages[bad].tolist()))[:8]} of the batch "
                                    f"plan are poisoned: read after free ({h} kv heads)")


def enable_poison(store) -> None:
    """Turn on free-page poisoning and poisoned-read checks for ``store`` (idempotent)."""
    if getattr(store, "poison_freed", False):
        return
    store.poison_freed = True
    table = store.table
    reset = table.reset
    freed_slots: list[int] = []

    def poisoned_reset() -> None:
        reset()
        freed_slots.clear()
        for tier in range(len(store.phys_pages)):
            _poison_phys(store, tier, slice(None))
        store.k_stage.fill_(float("nan"))
        store.v_stage.fill_(float("nan"))

    # A staging slot is poisoned when the next forward begins (its next staging or batch plan), not when it is
    # freed: the last layer's write frees the slots of pages it completes and that layer's attention still reads
    # them (the plan of this forward points there); poisoning at free corrupted exactly that read.

    def poison_freed_slots() -> None:
        free = set(table.free_stage)
        _poison_stage(store, [x for x in freed_slots if x in free])
        freed_slots.clear()

    stage = table.stage

    def poisoning_stage(pages):
        poison_freed_slots()
        return stage(pages)

    table.phys.on_free = lambda tier, phys: _poison_phys(store, tier, phys)
    table.slots.on_free = lambda _, slot: freed_slots.append(slot)
    table.stage = poisoning_stage
    table.reset = poisoned_reset
    plan_pages = store.plan_pages

    def checked(build):
        def plan(slots, lens, *args, **kwargs):
            poison_freed_slots()
            out = build(slots, lens, *args, **kwargs)
            # A decode plan is built before the forward writes each request's new token (its last slot, possibly
            # on a freshly allocated, still poisoned page): check every token but the last of each request,
            # through a host-side plan of that prefix (the static decode plan has no host copy to check).
            _check_plan(store, plan_pages(slots, (lens - 1).clamp(min=0)), (slots, lens))
            return out
        return plan

    store.plan_pages = checked(plan_pages)
    store.plan_pages_static = checked(store.plan_pages_static)
    poisoned_reset()
