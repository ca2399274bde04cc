# SPDX-License-Identifier: Apache-2.0
"""``SphKVPool``: SGLang's MHA KV pool interface over the tiered angle-coded :class:`SphKVStore`.

SGLang constructs it with the keyword arguments of :class:`MHATokenToKVPool` (the plugin passes
``sphkv_config`` on top, see ``plugin.py``). ``set_kv_buffer`` stages/codes tokens; attention reads
go through the store's batch plan (:meth:`SphKVStore.plan_pages`, the ``sphkv`` backend). A dense read of the whole layer
(``get_key_buffer`` & co.), a KV copy (speculative decoding), host offload (HiCache) or PD transfer
would need dense K/V that does not exist: they raise :class:`SphKVDenseAccessError`.
"""
from __future__ import annotations

import logging

import torch

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, unwrap_write_loc

from .config import SphKVServeConfig
from .debug import enable_poison, poison_requested
from .store import SphKVStore

__all__ = ["SphKVPool", "SphKVDenseAccessError"]

logger = logging.getLogger(__name__)
GB = 1 << 30


class SphKVDenseAccessError(RuntimeError):
    """A caller asked the sphkv pool for dense K/V buffers, which it does not keep."""


def _dense_access(what: str):
    def method(self, *args, **kwargs):
        raise SphKVDenseAccessError(
            f"SphKVPool.{what}: the sphkv pool stores angle-coded pages, not dense K/V buffers. "
            "Use --attention-backend sphkv (set by --sphkv) and leave speculative decoding, HiCache, "
            "PD disaggregation and KV offload off.")
    method.__name__ = what
    return method


class SphKVPool(MHATokenToKVPool):
    """KV pool of angle-coded, tier-homogeneous pages with a dense staging area.

    Parameters
    ----------
    size, page_size, dtype, head_num, head_dim, layer_num, device, enable_memory_saver, **kwargs
        As :class:`MHATokenToKVPool` (``size`` = logical token slots, page-aligned).
    sphkv_config : the server's :class:`SphKVServeConfig`; its ``page_size`` must equal SGLang's.

    Examples
    --------
    >>> pool = SphKVPool(256, 64, torch.bfloat16, 3, 64, 2, "cpu", False,
    ...                  sphkv_config=SphKVServeConfig(max_running_requests=2))   # doctest: +SKIP
    """

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, head_num: int, head_dim: int,
                 layer_num: int, device: str, enable_memory_saver: bool, *, sphkv_config: SphKVServeConfig,
                 **kwargs):
        if page_size != sphkv_config.page_size:
            raise ValueError(f"--page-size {page_size} differs from the sphkv page_size {sphkv_config.page_size}")
        if kwargs.get("v_head_dim") not in (None, head_dim):
            raise ValueError(f"sphkv needs v_head_dim == head_dim, got {kwargs['v_head_dim']} != {head_dim}")
        if kwargs.get("post_capture_active") or kwargs.get("enable_kv_cache_copy"):
            raise ValueError("sphkv does not support post-capture KV backing or speculative KV copies")
        kwargs.pop("quant_method", None)
        self.sphkv_config = sphkv_config
        super().__init__(size, page_size, dtype, head_num, head_dim, layer_num, device, enable_memory_saver,
                         **kwargs)

    # -- allocation --------------------------------------------------------------------------------------
    def _create_buffers(self):
        cfg = self.sphkv_config
        self.store = SphKVStore(cfg, num_pages=(self.size + self.page_size) // self.page_size,
                                num_layers=self.layer_num, num_kv_heads=self.head_num, head_dim=self.head_dim,
                                dtype=self.dtype, device=self.device)
        if poison_requested():                 # SPHKV_DEBUG_POISON=1: freed pages poisoned, reads checked
            enable_poison(self.store)
        # Tiny placeholders keep code that holds k_buffer/v_buffer references (pointer tables, layer
        # transfer counters) working; nothing reads them (get_key_buffer raises).
        self.k_buffer = [torch.zeros(self.page_size, self.head_num, self.head_dim, dtype=self.dtype,
                                     device=self.device) for _ in range(self.layer_num)]
        self.v_buffer = [torch.zeros_like(b) for b in self.k_buffer]
        self.k_data_ptrs = torch.tensor([x.data_ptr() for x in self.k_buffer], dtype=torch.uint64)
        self.v_data_ptrs = torch.tensor([x.data_ptr() for x in self.v_buffer], dtype=torch.uint64)
        self.data_ptrs = torch.cat([self.k_data_ptrs, self.v_data_ptrs])
        self.data_strides = torch.tensor([x.stride(0) * x.element_size() for x in self.k_buffer + self.v_buffer])

    def get_kv_size_bytes(self):
        """Allocated bytes ``(keys, values)``: coded arenas, staging, page tables."""
        return self.store.nbytes()

    def _finalize_allocation_log(self, num_tokens: int):
        super()._finalize_allocation_log(num_tokens)
        st, cfg = self.store, self.sphkv_config
        dense = 2 * 2 * self.layer_num * self.head_num * self.head_dim * num_tokens
        logger.info(
            "sphkv pool: %d tokens (%d pages of %d) in %.3f GB = %.1f B/token; a bf16 pool of the same tokens "
            "needs %.3f GB (%.2fx); tiers %s with physical pages %s; %d dense staging pages",
            num_tokens, num_tokens // self.page_size, self.page_size, sum(st.nbytes()) / GB,
            sum(st.nbytes()) / max(num_tokens, 1), dense / GB, dense / max(sum(st.nbytes()), 1),
            list(cfg.tiers), list(st.phys_pages), cfg.num_staging_pages)

    # -- write / read ------------------------------------------------------------------------------------
    def set_kv_buffer(self, layer, loc, cache_k, cache_v, k_scale=None, v_scale=None,
                      layer_id_override=None, dcp_kv_mask=None):
        """Stage ``cache_k``/``cache_v`` ``[N, H, d]`` at slots ``loc``; code pages that become full."""
        if dcp_kv_mask is not None:
            raise NotImplementedError("sphkv does not support decode context parallelism (DCP)")
        loc, _, _ = unwrap_write_loc(loc)
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        if k_scale is not None and float(k_scale) != 1.0:
            cache_k = cache_k / k_scale
        if v_scale is not None and float(v_scale) != 1.0:
            cache_v = cache_v / v_scale
        self.store.write(layer_id - self.start_layer, loc, cache_k, cache_v)

    def release_pages(self, pages: torch.Tensor) -> None:
        """Called by the allocator when SGLang frees logical pages."""
        self.store.release(pages)

    def clear(self) -> None:
        self.store.reset()

    def stats(self) -> dict:
        return self.store.stats()

    # -- dense access does not exist -----------------------------------------------------------------------
    get_key_buffer = _dense_access("get_key_buffer")
    get_value_buffer = _dense_access("get_value_buffer")
    get_kv_buffer = _dense_access("get_kv_buffer")
    _get_key_buffer = _dense_access("_get_key_buffer")
    _get_value_buffer = _dense_access("_get_value_buffer")
    move_kv_cache = _dense_access("move_kv_cache")
    get_cpu_copy = _dense_access("get_cpu_copy")
    load_cpu_copy = _dense_access("load_cpu_copy")
    get_contiguous_buf_infos = _dense_access("get_contiguous_buf_infos")
    get_device_pool_infos = _dense_access("get_device_pool_infos")
    host_pool_decls = _dense_access("host_pool_decls")
    get_raw_kv_buffer = _dense_access("get_raw_kv_buffer")
    set_kv_buffer_prefix_valid = _dense_access("set_kv_buffer_prefix_valid")   # speculative (dspark) commits
