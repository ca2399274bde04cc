# SPDX-License-Identifier: Apache-2.0
"""The ``sphkv`` attention backend: SGLang's attention over the sphkv pool through ``flashinfer_ext``.

One plan per forward batch (:meth:`SphKVAttnBackend.init_forward_metadata`), built from
``req_to_token`` / ``seq_lens`` as tensors — page lists per (request, kv head) in FlashInfer's
vocabulary (``indptr`` / ``indices`` / page lengths, tier of every page; the pages being filled are a
dense "staging" tier) by :meth:`SphKVStore.plan_pages` (extend) or :meth:`SphKVStore.plan_pages_static`
(decode: every row padded to the longest request's pages, computed on the device without a host
read), with no per-request Python loop — then one
:class:`~flashinfer_ext.BatchPrefillWithSphKVPagedKVCacheWrapper` ``run()`` per layer. The wrapper
picks the implementation for the device: the C++ page-tile kernels on CPU, the Triton decode kernels
on CUDA.

* Decode: the new token's page bookkeeping runs at plan time (:meth:`SphKVStore.begin_forward`), each
  layer writes its K/V first and then attends over the whole sequence, the new token included (read
  from its staging page).
* Extend (prefill, chunked prefill, mixed extend + decode batches): the new tokens attend to the
  cached prefix through the wrapper and to each other (causal) densely; the two states are merged by
  log-sum-exp; the K/V are written after reading, so a page completed in this forward is read densely
  by every layer of it. The new tokens' own attention is one padded-batch call for the whole batch
  (:func:`~sphkv_sglang.ragged.ragged_attention`: on CPU ATen's flash kernel in the model dtype, the one
  ``torch_native``'s SDPA runs).
* Logit soft-capping (``layer.logit_cap``) is applied in both parts.
* Sliding-window layers (``layer.sliding_window_size > -1``) read only their window:
  :class:`~sphkv_sglang.window.SlidingWindowAttention` (a second plan per window + the head page, merged
  by LSE; extend in query blocks).

Optionally accumulates each page's attention mass in the pool (RDR's utility signal): every
``MASS_EVERY``-th decode forward runs through the decode wrapper with its key-mass epilogue (all
layers, summed over query heads); extend forwards do not sample it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from flashinfer_ext import BatchDecodeWithSphKVPagedKVCacheWrapper, BatchPrefillWithSphKVPagedKVCacheWrapper
from sphkv.attention import merge_state
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.radix_attention import AttentionType

from .ragged import ragged_attention
from .window import SlidingWindowAttention, is_sliding

__all__ = ["SphKVAttnBackend"]

MASS_EVERY = 16          # decode forwards between two attention-mass samples


@dataclass
class _BatchPlan:
    """Layout of one forward, shared by all layers."""

    decode: bool
    has_prefix: bool                 # any request reads cached pages (the wrapper was planned)
    q_starts: list | None = None     # extend: first row of each request's new tokens in q / k / v
    q_lens: list | None = None       # extend: new tokens per request
    pages: torch.Tensor | None = None   # [nnz] logical page of every planned entry (mass tracking)
    mass: torch.Tensor | None = None    # [nnz, P] float32 key-mass buffer when this forward samples mass


def _cpu_backend() -> str:
    from sphkv_kernels.cpu_decode import available

    return "cpu" if available() else "reference"


class SphKVAttnBackend(AttentionBackend):
    """Attention over angle-coded pages with dense staging pages, batched through ``flashinfer_ext``.

    Examples
    --------
    >>> backend = SphKVAttnBackend(model_runner)      # doctest: +SKIP  (built by SGLang's registry)
    """

    def __init__(self, model_runner):
        super().__init__()
        from .pool import SphKVPool

        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, SphKVPool):
            raise TypeError(f"--attention-backend sphkv needs the sphkv KV pool (launch with --sphkv); "
                            f"got {type(pool).__name__}")
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = pool
        self.store = pool.store
        # Query heads of this rank, as SGLang's own backends count them: SGLang 0.5.23's ModelRunner has no
        # ``tp_size`` attribute (reading it gave 1 on every rank: all heads planned on a tp-2 rank).
        from sglang.srt.runtime_context import get_parallel

        self.num_q_heads = model_runner.model_config.get_max_num_attention_heads() // get_parallel().attn_tp_size
        self.track_mass = pool.sphkv_config.track_mass
        # A served CPU engine always takes the C++ CPU kernels: "auto" would pick the Triton interpreter
        # when TRITON_INTERPRET=1 leaks into the server's environment (a test harness sets it).
        backend = "auto" if torch.device(self.device).type == "cuda" else _cpu_backend()
        self.wrapper_backend = backend
        self.wrapper = BatchPrefillWithSphKVPagedKVCacheWrapper(tiers=self.store.wrapper_tiers, backend=backend)
        self.mass_wrapper = BatchDecodeWithSphKVPagedKVCacheWrapper(
            torch.empty(1 << 20, dtype=torch.uint8, device=self.device), tiers=self.store.wrapper_tiers,
            backend=backend)
        # extend over a cached prefix on CPU: page tiles through ATen's flash kernel in the model dtype (bf16 / fp16
        # models: bfloat16 tiles, as SGLang's torch_native SDPA attends in bf16), float32 for float32 models
        # (SPHKV_CPU_FLASH names another route: "float32", "off")
        self.extend_options = None if backend != "cpu" else {"flash": os.environ.get("SPHKV_CPU_FLASH") or (
            "float32" if self.store.dtype == torch.float32 else "bfloat16")}
        # the new tokens' own attention when merged with a cached prefix: the model dtype (ATen's flash kernel, as
        # SGLang's torch_native SDPA and an uncached request run it) when the prefix part is in bfloat16 tiles too;
        # float32 otherwise. Measured on the partial-page reuse prompt of tests/test_sglang_server.py (2026-12-02):
        # first-token logprob cold -1.6615, warm (230 cached) -1.6800 with bf16 vs -1.7213 with float32 (sphkv-8).
        flash = (self.extend_options or {}).get("flash")
        self._ragged_dtype = None if flash == "bfloat16" else torch.float32
        self.forward_metadata: _BatchPlan | None = None
        self._decodes = 0
        self.window = SlidingWindowAttention(self)

    # -- metadata --------------------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        """Plan the batch once: page lists from ``req_to_token`` / ``seq_lens`` (tensor ops, no per-request loop)."""
        fb = forward_batch
        st = self.store
        self.window.reset(fb)
        if fb.forward_mode.is_decode_or_idle():
            if fb.batch_size == 0 or fb.out_cache_loc is None or fb.out_cache_loc.numel() == 0:
                self.forward_metadata = _BatchPlan(decode=True, has_prefix=False)
                return
            st.begin_forward(fb.out_cache_loc)          # the new tokens' pages are staged before any read
            self._decodes += 1
            pp = self._decode_pages(fb)
            plan = _BatchPlan(decode=True, has_prefix=True, pages=pp["pages"])
            if self.track_mass and self._decodes % MASS_EVERY == 0:
                self.mass_wrapper.plan(pp["indptr"], pp["indices"], pp["page_tiers"], None, self.num_q_heads, st.H,
                                       st.d, st.P, page_lens=pp["page_lens"], key_mass=True, device=self.device)
                plan.mass = torch.empty(pp["indices"].numel(), st.P, dtype=torch.float32, device=self.device)
            else:
                n = fb.batch_size
                self.wrapper.plan(torch.arange(n + 1), pp["indptr"], pp["indices"], pp["page_tiers"], None,
                                  self.num_q_heads, st.H, st.d, st.P, page_lens=pp["page_lens"], device=self.device)
            self.forward_metadata = plan
            return
        q_lens = (list(fb.extend_seq_lens_cpu) if fb.extend_seq_lens_cpu is not None
                  else fb.extend_seq_lens.cpu().tolist())
        seq = fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens.cpu()
        lens = seq.to(torch.int64) - torch.tensor(q_lens, dtype=torch.int64)
        qo = torch.zeros(len(q_lens) + 1, dtype=torch.int64)
        qo[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int64), 0)
        plan = _BatchPlan(decode=False, has_prefix=bool((lens > 0).any()), q_starts=qo[:-1].tolist(), q_lens=q_lens)
        if plan.has_prefix:
            pp = st.plan_pages(self.req_to_token_pool.req_to_token[fb.req_pool_indices], lens)
            self.wrapper.plan(qo, pp["indptr"], pp["indices"], pp["page_tiers"], None, self.num_q_heads, st.H,
                              st.d, st.P, page_lens=pp["page_lens"], device=self.device,
                              kernel_options=self.extend_options)
            plan.pages = pp["pages"]
        self.forward_metadata = plan

    # -- forward ---------------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache):
        self._check_layer(layer)
        if is_sliding(layer):
            return self.window.forward(q, k, v, layer, forward_batch, save_kv_cache)
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q3 = q.reshape(-1, hq, d)
        k3, v3 = k.reshape(-1, hkv, d), v.reshape(-1, hkv, layer.v_head_dim)
        plan, pool = self.forward_metadata, self.token_to_kv_pool
        cap = float(layer.logit_cap or 0.0)
        local = layer.layer_id - pool.start_layer
        rows = q3.shape[0]
        if plan.decode:
            if save_kv_cache:
                pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k3, v3)
            if not plan.has_prefix:
                return q.new_zeros(rows, hq * layer.v_head_dim)
            if plan.mass is not None and cap == 0:
                out = self.mass_wrapper.run(q3, self.store.layer_cache(local), sm_scale=layer.scaling,
                                            key_mass_out=plan.mass)
                self.store.add_mass(plan.pages, plan.mass.sum(1))
            else:
                if plan.mass is not None:           # soft-capped model: the sampled forward plans late
                    self._replan_decode(forward_batch)
                out = self.wrapper.run(q3, self.store.layer_cache(local), sm_scale=layer.scaling,
                                       logits_soft_cap=cap)
            return out.to(q.dtype).reshape(rows, hq * layer.v_head_dim)
        causal = layer.attn_type != AttentionType.ENCODER_ONLY
        out = self._extend(q3, k3, v3, layer, local, plan, causal, cap)
        if save_kv_cache and k is not None and v is not None:
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k3, v3)
        return out.reshape(rows, hq * layer.v_head_dim)

    def _decode_max_pages(self, fb) -> int:
        """Entries per (request, kv head) row of a decode plan: the longest request's pages, read from
        SGLang's host copy of the sequence lengths (``seq_lens_cpu``; no device read), else the width of
        ``req_to_token`` (every request's page capacity, the shape a CUDA graph would fix)."""
        P = self.store.P
        seq_cpu = getattr(fb, "seq_lens_cpu", None)
        if seq_cpu is not None and seq_cpu.numel():
            return max(1, -(-int(seq_cpu.max()) // P))
        return -(-self.req_to_token_pool.req_to_token.shape[1] // P)

    def _decode_pages(self, fb) -> dict:
        """The decode plan's page lists: :meth:`SphKVStore.plan_pages_static` on ``seq_lens``' device (static
        row width, no ``.tolist()`` / ``.item()`` / boolean-mask indexing of device tensors)."""
        slots = self.req_to_token_pool.req_to_token[fb.req_pool_indices]
        return self.store.plan_pages_static(slots, fb.seq_lens, self._decode_max_pages(fb))

    def _replan_decode(self, fb) -> None:
        st, n = self.store, fb.batch_size
        pp = self._decode_pages(fb)
        self.wrapper.plan(torch.arange(n + 1), pp["indptr"], pp["indices"], pp["page_tiers"], None,
                          self.num_q_heads, st.H, st.d, st.P, page_lens=pp["page_lens"], device=self.device)
        self.forward_metadata.mass = None

    def _extend(self, q3, k3, v3, layer, local, plan, causal, cap):
        """New tokens: causal attention among themselves (:func:`~sphkv_sglang.ragged.ragged_attention`, the
        whole batch in one call), merged by log-sum-exp with the wrapper's prefix attention."""
        o, lse = ragged_attention(q3, k3, v3, plan.q_lens, scale=layer.scaling, causal=causal, cap=cap,
                                  compute_dtype=self._ragged_dtype if plan.has_prefix else None)
        if plan.has_prefix:                           # merge with the cached prefix's state (rows without one: lse -inf)
            pre_o, pre_lse = self.wrapper.run(q3, self.store.layer_cache(local), sm_scale=layer.scaling,
                                              logits_soft_cap=cap, return_lse=True)
            o, _ = merge_state(pre_o.float(), pre_lse.float(), o, lse)
        return o.to(q3.dtype)

    @staticmethod
    def _check_layer(layer) -> None:
        if layer.is_cross_attention:
            raise NotImplementedError("sphkv does not support cross-attention layers")
        if is_sliding(layer) and layer.attn_type == AttentionType.ENCODER_ONLY:
            raise NotImplementedError(f"sphkv does not support bidirectional sliding-window layers "
                                      f"(layer {layer.layer_id}: window {layer.sliding_window_size}, encoder-only)")

    def support_triton(self):
        return False
