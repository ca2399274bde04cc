# SPDX-License-Identifier: Apache-2.0
"""Paged allocator that tells the sphkv pool when SGLang frees pages.

SGLang's :class:`PagedTokenToKVPoolAllocator` hands out logical pages and takes them back through
``_release_page_ids`` (every free path — ``free``, ``free_segment(s)``, ``free_page_ids``, the end of
a free group — ends there) and ``clear``. This subclass forwards both to the pool so the pool drops
the staging slots and physical coded pages of freed logical pages: no leak, and a freed page is never
read again (its table entries are cleared before it can be reallocated).
"""
from __future__ import annotations

import torch

from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator

__all__ = ["SphKVPagedAllocator"]


class SphKVPagedAllocator(PagedTokenToKVPoolAllocator):
    """:class:`PagedTokenToKVPoolAllocator` whose kvcache is a ``SphKVPool``.

    Examples
    --------
    >>> alloc = SphKVPagedAllocator(size=256, page_size=64, dtype=torch.bfloat16, device="cpu",
    ...                             kvcache=pool, need_sort=False)            # doctest: +SKIP
    """

    def _release_page_ids(self, *page_ids: torch.Tensor):
        if page_ids:
            self._kvcache.release_pages(torch.cat([p.reshape(-1) for p in page_ids]))
        super()._release_page_ids(*page_ids)

    def clear(self):
        super().clear()
        if getattr(self, "_kvcache", None) is not None:
            self._kvcache.clear()

    @classmethod
    def from_allocator(cls, alloc: PagedTokenToKVPoolAllocator) -> "SphKVPagedAllocator":
        """The same allocator (size, page size, dtype, device, pool, sort mode), fresh."""
        return cls(alloc.size, alloc.page_size, alloc.dtype, alloc.device, alloc._kvcache, alloc.need_sort)
