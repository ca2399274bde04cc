# SPDX-License-Identifier: Apache-2.0
"""The ``sphkv`` attention backend: extend and decode over the sphkv pool's pages.

Per request and layer: read the cached prefix from the pool (coded pages of any tier + the dense
staged tokens of the page being filled), attend with the new tokens' dense K/V
(:func:`~sphkv_sglang.reference.prefix_attention`, causal over the new tokens), then write the new
tokens into the pool (which codes pages that became full). Reading before writing means a page
completed in this forward is read densely by every layer of this forward.

Built on the pattern of SGLang's ``torch_native`` backend (a per-request loop, no CUDA graphs).
Optionally accumulates each prefix page's attention mass in the pool — the radix retention's
utility signal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.radix_attention import AttentionType

from .reference import prefix_attention

__all__ = ["SphKVAttnBackend"]


@dataclass
class _BatchPlan:
    """Host-side per-request layout of one forward, shared by all layers."""

    prefix_slots: list           # [prefix_len_i] int64 slot ids of each request's cached prefix
    q_starts: list               # start row of each request's new tokens in q / k / v
    q_lens: list                 # number of new tokens per request


class SphKVAttnBackend(AttentionBackend):
    """Attention over angle-coded pages with a dense tail (pure-torch reference path).

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
        self.track_mass = pool.sphkv_config.track_mass
        self.forward_metadata: _BatchPlan | None = None

    # -- metadata --------------------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        fb = forward_batch
        seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.cpu().tolist()
        if fb.forward_mode.is_decode_or_idle():
            q_lens = [1] * len(seq_lens)
        elif fb.extend_seq_lens_cpu is not None:
            q_lens = list(fb.extend_seq_lens_cpu)
        else:
            q_lens = fb.extend_seq_lens.cpu().tolist()
        rows = fb.req_pool_indices.cpu().tolist()
        table = self.req_to_token_pool.req_to_token
        prefix = [table[r, : s - n].to("cpu", torch.int64) for r, s, n in zip(rows, seq_lens, q_lens)]
        starts = [0]
        for n in q_lens[:-1]:
            starts.append(starts[-1] + n)
        self.forward_metadata = _BatchPlan(prefix, starts, q_lens)

    # -- forward ---------------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache):
        self._check_layer(layer)
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q3 = q.reshape(-1, hq, d)
        k3, v3 = k.reshape(-1, hkv, d), v.reshape(-1, hkv, layer.v_head_dim)
        out = torch.empty(q3.shape[0], hq, layer.v_head_dim, dtype=q.dtype, device=q.device)
        pool, plan = self.token_to_kv_pool, self.forward_metadata
        causal = layer.attn_type != AttentionType.ENCODER_ONLY
        for slots, s, n in zip(plan.prefix_slots, plan.q_starts, plan.q_lens):
            if n == 0:
                continue
            view = pool.read_prefix(layer.layer_id, slots)
            res = prefix_attention(q3[s:s + n], view, k3[s:s + n], v3[s:s + n], pool.store, scale=layer.scaling,
                                   causal=causal, logit_cap=float(layer.logit_cap or 0.0),
                                   return_mass=self.track_mass)
            if self.track_mass:
                res, mass = res
                if mass is not None:
                    pool.store.add_mass(*mass)
            out[s:s + n] = res.to(out.dtype)
        if save_kv_cache and k is not None and v is not None:
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k3, v3)
        return out.reshape(q3.shape[0], hq * layer.v_head_dim)

    @staticmethod
    def _check_layer(layer) -> None:
        if layer.is_cross_attention:
            raise NotImplementedError("sphkv does not support cross-attention layers")
        if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
            raise NotImplementedError(f"sphkv does not support sliding-window layers "
                                      f"(layer {layer.layer_id}: window {layer.sliding_window_size})")

    def support_triton(self):
        return False
