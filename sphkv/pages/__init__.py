# SPDX-License-Identifier: Apache-2.0
"""Tier-homogeneous paged storage: arenas per tier kind, the paged store, reference attention over pages.

Example
-------
>>> import torch
>>> from sphkv.tiers import TierSet
>>> from sphkv.pages import PagedStore, paged_attention
>>> store = PagedStore(TierSet.default(page_size=16), 8, num_layers=1, num_kv_heads=1)
>>> k, v = torch.randn(1, 50, 64), torch.randn(1, 50, 64)
>>> plan = torch.tensor([[0] * 10 + [1] * 30 + [3] * 10])     # dense, sphkv-4, drop
>>> store.write_plan(0, k, v, plan)
>>> paged_attention(torch.randn(3, 1, 64), store, 0).shape
torch.Size([3, 1, 64])
"""
from .arenas import TIER_KINDS as TIER_KINDS, make_arena as make_arena, poison_page as poison_page
from .arenas import roundtrip as roundtrip, tier_kind as tier_kind
from .attention import paged_attention as paged_attention
from .lists import PageLists as PageLists
from .store import OutOfPagesError as OutOfPagesError, PageError as PageError, PageMeta as PageMeta
from .store import PagedStore as PagedStore, StoreBytes as StoreBytes

__all__ = ["TIER_KINDS", "make_arena", "poison_page", "roundtrip", "tier_kind",
           "paged_attention", "PageLists", "OutOfPagesError", "PageError", "PageMeta", "PagedStore", "StoreBytes"]
