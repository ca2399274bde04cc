# SPDX-License-Identifier: Apache-2.0
"""A backend over a sphkv pool, built the way SGLang's model runner builds them, without a server (for tests).

:class:`SeamBackend` holds a :class:`~sphkv_sglang.pool.SphKVPool`, the :class:`~sphkv_sglang.backend.SphKVAttnBackend`
over it, ``num_layers`` decoder layers and a ``req_to_token`` table; :meth:`SeamBackend.forward` runs one forward
batch (extend or decode) through every layer with seeded random ``q``/``k``/``v`` in bfloat16.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .config import SphKVServeConfig

__all__ = ["SeamBackend"]


class SeamBackend:
    """``req_to_token``: ``[rows, width]`` int32 slot ids (a row's first tokens live in its first columns);
    ``kv_heads`` × ``group`` query heads of ``head_dim``; the pool holds ``pool_pages`` pages of ``page_size``."""

    def __init__(self, req_to_token: torch.Tensor, *, page_size: int, kv_heads: int = 2, group: int = 3,
                 head_dim: int = 64, num_layers: int = 2, pool_pages: int = 20, preset: str = "sphkv-4",
                 staging_pages: int = 6, seed: int = 0, prepare_pool=None):
        from sglang.srt.layers.radix_attention import AttentionType
        from sglang.srt.runtime_context import get_parallel

        from .backend import SphKVAttnBackend
        from .pool import SphKVPool

        rows = req_to_token.shape[0]
        cfg = SphKVServeConfig(preset=preset, page_size=page_size, max_running_requests=rows,
                               staging_pages=staging_pages)
        self.pool = SphKVPool(pool_pages * page_size, page_size, torch.bfloat16, kv_heads, head_dim, num_layers,
                              "cpu", False, sphkv_config=cfg)
        if prepare_pool is not None:                   # e.g. debug.enable_poison, before the backend exists
            prepare_pool(self.pool)
        self.rt, self.h, self.g, self.d = req_to_token, kv_heads, group, head_dim
        runner = SimpleNamespace(token_to_kv_pool=self.pool, device="cpu",
                                 req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                                 model_config=SimpleNamespace(get_max_num_attention_heads=lambda: kv_heads * group))
        with get_parallel().override(attn_tp_size=1):
            self.backend = SphKVAttnBackend(runner)
        self.layers = [SimpleNamespace(layer_id=i, tp_q_head_num=kv_heads * group, tp_k_head_num=kv_heads,
                                       qk_head_dim=head_dim, v_head_dim=head_dim, scaling=head_dim ** -0.5,
                                       logit_cap=0.0, sliding_window_size=-1, is_cross_attention=False,
                                       attn_type=AttentionType.DECODER) for i in range(num_layers)]
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, q_lens: list[int], prefix: list[int], decode: bool) -> torch.Tensor:
        """One forward batch: row ``r`` adds ``q_lens[r]`` tokens after ``prefix[r]`` cached ones. Returns the
        layers' outputs ``[num_layers, sum(q_lens), kv_heads * group * head_dim]`` float32."""
        rt, b = self.rt, len(q_lens)
        seq = torch.tensor([a + n for a, n in zip(prefix, q_lens)])
        loc = torch.cat([rt[r, a:a + n].long() for r, (a, n) in enumerate(zip(prefix, q_lens))])
        fb = SimpleNamespace(forward_mode=SimpleNamespace(is_decode_or_idle=lambda: decode), batch_size=b,
                             out_cache_loc=loc, req_pool_indices=torch.arange(b), seq_lens=seq, seq_lens_cpu=seq,
                             extend_seq_lens_cpu=list(q_lens), extend_seq_lens=torch.tensor(q_lens))
        self.backend.init_forward_metadata(fb)
        n, outs, be = sum(q_lens), [], self.backend
        for layer in self.layers:
            q, k, v = (torch.randn(n, x * self.d, generator=self.gen).bfloat16() for x in (self.h * self.g, self.h, self.h))
            outs.append((be.forward_decode if decode else be.forward_extend)(q, k, v, layer, fb).float())
        return torch.stack(outs)
