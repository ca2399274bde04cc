# SPDX-License-Identifier: Apache-2.0
"""Sliding-window layers in the SGLang backend, at the seam: the real ``SphKVAttnBackend`` over a real
``SphKVPool`` (no server), driven the way SGLang's model runner drives it (plan once per forward, then
every layer), against a float64 oracle that reads each token's K/V independently of the code under test
(staging pages as stored, coded pages through ``TierPool.read`` + the codecs, new tokens as given) and
applies the window ``0 <= i - j <= W`` query by query.

Layer 0 is sliding (window 37: not a multiple of the page size 16, so head pages are partial), layer 1 is
global; three requests of different lengths go through a prefill without prefix, a chunked-prefill extend
over a cached prefix (coded pages + a partial staged page) and decode steps past several windows.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.layers.radix_attention import AttentionType  # noqa: E402

from sphkv.pool import TierPool  # noqa: E402
from sphkv_sglang.config import SphKVServeConfig  # noqa: E402
from sphkv_sglang.window import dense_tokens, window_attention, window_start  # noqa: E402

P, H, G, D, W = 16, 2, 3, 64, 37


class _Mode:
    def __init__(self, decode: bool):
        self.decode = decode

    def is_decode_or_idle(self):
        return self.decode


def _layer(i: int, window: int, cap: float = 0.0):
    return SimpleNamespace(layer_id=i, tp_q_head_num=H * G, tp_k_head_num=H, qk_head_dim=D, v_head_dim=D,
                           scaling=D ** -0.5, logit_cap=cap, sliding_window_size=window,
                           is_cross_attention=False, attn_type=AttentionType.DECODER)


@pytest.fixture(scope="module")
def backend():
    from sphkv_sglang.backend import SphKVAttnBackend
    from sphkv_sglang.pool import SphKVPool

    cfg = SphKVServeConfig(preset="sphkv-4", page_size=P, max_running_requests=4, staging_pages=12)
    pool = SphKVPool(40 * P, P, torch.bfloat16, H, D, 2, "cpu", False, sphkv_config=cfg)
    req_to_token = torch.zeros(3, 14 * P, dtype=torch.int32)
    for r, first in enumerate((1, 15, 29)):           # request r owns pages first .. first + 9
        req_to_token[r, :10 * P] = torch.arange(first * P, (first + 10) * P)
    runner = SimpleNamespace(token_to_kv_pool=pool, device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                             model_config=SimpleNamespace(num_attention_heads=H * G, get_max_num_attention_heads=lambda: H * G))
    from sglang.srt.runtime_context import get_parallel

    with get_parallel().override(attn_tp_size=1):      # what a tp-1 scheduler publishes
        return SphKVAttnBackend(runner)


def _stored_kv(store, layer, slots, n):
    """float64 K/V ``[H, n, d]`` of a request's first ``n`` stored tokens, page by page, independent of
    :func:`dense_tokens` (staging pages as stored; coded pages through ``TierPool.read`` + the codecs)."""
    ks, vs = [], []
    for i in range(0, n, P):
        page, cnt = int(slots[i]) // P, min(P, n - i)
        st = int(store.table.stage_of[page])
        if st >= 0:
            ks.append(store.k_stage[layer, st, :, :cnt].double())
            vs.append(store.v_stage[layer, st, :, :cnt].double())
            continue
        t, phys = int(store.table.tier_of[page]), int(store.table.phys_of[page])
        assert t >= 0, f"page {page} neither staged nor coded"
        arena: TierPool = store.arenas[t][layer]
        kc, vc, mean = arena.read(torch.arange(phys * H, phys * H + H), torch.full((H,), cnt))
        k = (arena.kcodec.decode_rotated(kc).double() + mean.double()) @ arena.kcodec.rotation.double()
        ks.append(k.reshape(H, cnt, D))
        vs.append(arena.vquant.decode(vc).double().reshape(H, cnt, D))
    if not ks:
        return torch.zeros(H, 0, D, dtype=torch.float64), torch.zeros(H, 0, D, dtype=torch.float64)
    return torch.cat(ks, 1), torch.cat(vs, 1)


def _oracle(store, layer, slots, rows, q, q_pos, new_kv, prefix_len, window, cap=0.0):
    """Per query: softmax over keys ``j`` with ``0 <= i - j <= window`` (None: causal, no window)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    kv = {}
    for b in set(rows):
        k0, v0 = _stored_kv(store, layer, slots[b], prefix_len[b])
        kv[b] = (torch.cat([k0, new_kv[b][0].transpose(0, 1).double()], 1),
                 torch.cat([v0, new_kv[b][1].transpose(0, 1).double()], 1))
    for i in range(q.shape[0]):
        b, pos = rows[i], int(q_pos[i])
        lo = 0 if window is None else max(0, pos - window)
        k, v = kv[b][0][:, lo:pos + 1], kv[b][1][:, lo:pos + 1]                 # [H, m, d]
        qq = q[i].double().reshape(H, G, D)
        s = qq @ k.transpose(1, 2) * D ** -0.5                                    # [H, G, m]
        if cap:
            s = cap * torch.tanh(s / cap)
        out[i] = (torch.softmax(s, -1) @ v).reshape(H * G, D)
    return out


def _forward(backend, layers, q_lens, prefix_lens, g, decode=False):
    """One forward of the batch; returns per layer (out, oracle, full-attention oracle) and the layout."""
    rows_tok = backend.req_to_token_pool.req_to_token
    slots = rows_tok.long()
    seq = torch.tensor([p + n for p, n in zip(prefix_lens, q_lens)])
    loc = torch.cat([rows_tok[b, p:p + n].long() for b, (p, n) in enumerate(zip(prefix_lens, q_lens))])
    fb = SimpleNamespace(forward_mode=_Mode(decode), batch_size=len(q_lens), out_cache_loc=loc,
                         req_pool_indices=torch.arange(len(q_lens)), seq_lens=seq, seq_lens_cpu=seq,
                         extend_seq_lens_cpu=list(q_lens), extend_seq_lens=torch.tensor(q_lens))
    backend.init_forward_metadata(fb)
    n = sum(q_lens)
    rows = [b for b, m in enumerate(q_lens) for _ in range(m)]
    q_pos = torch.cat([torch.arange(p, p + m) for p, m in zip(prefix_lens, q_lens)])
    results = []
    for layer in layers:
        q = torch.randn(n, H * G, D, generator=g).to(torch.bfloat16)
        k = (torch.randn(n, H, D, generator=g) * 2 + 1).to(torch.bfloat16)
        v = torch.randn(n, H, D, generator=g).to(torch.bfloat16)
        new_kv, s = [], 0
        for m in q_lens:
            new_kv.append((k[s:s + m], v[s:s + m]))
            s += m
        # the oracle reads the store before this layer's write: the state the backend reads (pages completed
        # by this forward stay staged until its last layer has written)
        st, cap = backend.store, float(layer.logit_cap)
        window = layer.sliding_window_size if layer.sliding_window_size > -1 else None
        ref = _oracle(st, layer.layer_id, slots, rows, q, q_pos, new_kv, list(prefix_lens), window, cap)
        full = _oracle(st, layer.layer_id, slots, rows, q, q_pos, new_kv, list(prefix_lens), None, cap)
        fwd = backend.forward_decode if decode else backend.forward_extend
        out = fwd(q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1), layer, fb).float().reshape(n, H * G, D)
        results.append((out.double(), ref, full))
    return results


def _check(results, *, sliding_differs: bool):
    for i, (out, ref, full) in enumerate(results):
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2, msg=lambda m: f"layer {i}: {m}")
    if sliding_differs:            # the window matters here: attending to everything gives other outputs
        out, ref, full = results[0]
        assert float((full - ref).abs().max()) > 0.1


@pytest.mark.parametrize("cap", [0.0, 4.0])
def test_sliding_layers_read_only_their_window(backend, cap):
    g = torch.Generator().manual_seed(5 + int(cap))
    backend.store.reset()
    layers = [_layer(0, W, cap), _layer(1, -1)]
    # 1) prefill without a cached prefix: 70, 45 and 5 tokens (longer than the window, and shorter)
    _check(_forward(backend, layers, [70, 45, 5], [0, 0, 0], g), sliding_differs=True)
    # 2) chunked prefill over the cached prefix (coded pages + a partial staged page) for two requests,
    #    one more prefill for the third: the first new queries' windows start inside the cached prefix
    _check(_forward(backend, layers, [30, 41, 60], [70, 45, 5], g), sliding_differs=True)
    # 3) decode steps: windows whose head page is coded (partial), staged, or page-aligned
    lens = [100, 86, 65]
    for _ in range(4):
        _check(_forward(backend, layers, [1, 1, 1], lens, g, decode=True), sliding_differs=True)
        lens = [x + 1 for x in lens]
    backend.store.table.check()


def test_window_helpers_on_odd_sizes():
    assert window_start(torch.tensor([1, 37, 38, 39, 200]), 37).tolist() == [0, 0, 0, 1, 162]
    with pytest.raises(ValueError, match="window must be >= 0, got -2"):
        window_start(torch.tensor([3]), -2)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(7, 6, 24, generator=g), torch.randn(2, 11, 24, generator=g), torch.randn(2, 11, 24, generator=g)
    q_pos, k_pos = torch.arange(20, 27), torch.arange(14, 25)
    o, lse = window_attention(q, k, v, q_pos, k_pos, 5, 0.3)
    for i in range(7):
        vis = [(j, int(p)) for j, p in enumerate(k_pos) if 0 <= int(q_pos[i]) - int(p) <= 5]
        idx = torch.tensor([j for j, _ in vis])
        for h in range(6):
            s = (q[i, h] @ k[h // 3, idx].T) * 0.3
            torch.testing.assert_close(o[i, h], torch.softmax(s, -1) @ v[h // 3, idx])
            torch.testing.assert_close(lse[i, h], torch.logsumexp(s, -1))
    o, lse = window_attention(q[:1], k, v, torch.tensor([5]), k_pos, 5, 0.3)      # nothing visible
    assert bool((o == 0).all()) and bool(torch.isinf(lse).all())
    with pytest.raises(ValueError, match="query heads 5 are not a multiple of kv heads 2"):
        window_attention(q[:, :5], k, v, q_pos, k_pos, 5, 0.3)


def test_dense_tokens_refuses_a_freed_page(backend):
    st = backend.store
    st.reset()
    with pytest.raises(Exception, match="neither staged nor coded"):
        dense_tokens(st, 0, backend.req_to_token_pool.req_to_token[0].long(), 0, 20)


def test_bidirectional_sliding_layer_is_refused():
    from sphkv_sglang.backend import SphKVAttnBackend

    layer = SimpleNamespace(layer_id=4, is_cross_attention=False, sliding_window_size=127,
                            attn_type=AttentionType.ENCODER_ONLY)
    with pytest.raises(NotImplementedError, match=r"bidirectional sliding-window layers \(layer 4: window 127"):
        SphKVAttnBackend._check_layer(layer)
    SphKVAttnBackend._check_layer(_layer(4, 127))         # causal sliding layers are served
