# SPDX-License-Identifier: Apache-2.0
"""Masks, soft-capping, sliding windows over coded pages, RDR on sliding models, and refused features."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sphkv_hf
from sphkv import AngleKeyCodec, GroupValueQuantizer, SphKVConfig
from sphkv_hf import CachePolicy, CodedSegment, DenseSegment, SphKVCache, segment_attention
from sphkv_hf.attention import sphkv_attention_forward
from sphkv_hf.masks import Visibility
from sphkv_hf.retention import ReplanConfig, Replanner, compress_cache

VOCAB, WINDOW = 96, 12


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_importing_registers_nothing_install_registers_attention_and_mask():
    code = ("import sys, sphkv_hf\n"
            "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as M\n"
            "assert 'sphkv' not in M._global_mapping\n"
            "mu = sys.modules.get('transformers.modeling_utils')   # where the attention registry lives\n"
            "assert mu is None or 'sphkv' not in mu.AttentionInterface._global_mapping\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as M

    assert sphkv_hf.install() == "sphkv"
    assert AttentionInterface._global_mapping["sphkv"] is sphkv_hf.sphkv_attention_forward
    assert M._global_mapping["sphkv"] is M._global_mapping["sdpa"]


def _window_reference(q, k, v, q_pos, window, scale, softcap=None):
    """Eager reference over dense K/V ``[B, Hkv, N, d]`` at positions ``0..N-1``: causal + window + soft-cap."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    kp = torch.arange(k.shape[-2])
    ok = (kp[None, :] <= q_pos[:, None]) & (kp[None, :] > q_pos[:, None] - window)
    return torch.softmax(s.masked_fill(~ok, float("-inf")), -1) @ v


@pytest.mark.parametrize("softcap", [None, 1.0])
def test_window_over_dense_and_coded_segments_matches_eager(softcap):
    """Positions carried by pages: a window that cuts through a page masks slots inside it."""
    d, p = 32, 4
    cfg = SphKVConfig.from_name("sphkv-8", head_dim=d, page_size=p)
    kc, vq = AngleKeyCodec(cfg), GroupValueQuantizer(cfg)
    k, v = _rand(1, 2, 23, d, seed=1), _rand(1, 2, 23, d, seed=2)
    q = _rand(1, 4, 3, d, seed=3)
    pos = torch.arange(23)[None, None]
    segs = [DenseSegment.build(k[..., :8, :], v[..., :8, :], positions=pos[..., :8]),
            CodedSegment.encode(k[..., 8:20, :], v[..., 8:20, :], kc, vq, positions=pos[..., 8:20])]
    vis = Visibility.for_queries(23, 3, window=7)
    got = segment_attention(q, segs, k[..., 20:, :], v[..., 20:, :], visibility=vis, tail_start=20, softcap=softcap)
    kd = torch.cat([k[..., :8, :], kc.decode(segs[1].kcode), k[..., 20:, :]], -2)
    vd = torch.cat([v[..., :8, :], vq.decode(segs[1].vcode), v[..., 20:, :]], -2)
    want = _window_reference(q, kd, vd, torch.arange(20, 23), 7, d ** -0.5, softcap)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_transformers_mask_is_read_at_each_slots_position():
    """A 4-D boolean mask (here chunked causal, chunk 5) over positions; slots held out of order per kv head."""
    d = 16
    k, v, q = _rand(1, 2, 12, d, seed=4), _rand(1, 2, 12, d, seed=5), _rand(1, 4, 2, d, seed=6)
    qp, kp = torch.arange(10, 12), torch.arange(12)
    mask = ((kp[None, :] <= qp[:, None]) & (kp[None, :] // 5 == qp[:, None] // 5))[None, None]   # [1, 1, 2, 12]
    keep = torch.tensor([[0, 3, 7, 10, 11], [2, 9, 10, 11, 11]])                 # head 1 holds 4 tokens + padding
    lengths = torch.tensor([[5, 4]])
    kk = torch.stack([k[0, h, keep[h]] for h in range(2)])[None]
    vv = torch.stack([v[0, h, keep[h]] for h in range(2)])[None]
    seg = DenseSegment.build(kk[..., :3, :], vv[..., :3, :], positions=keep[None, :, :3])
    padded = DenseSegment.build(kk[..., 3:, :], vv[..., 3:, :], positions=keep[None, :, 3:],
                                lengths=torch.tensor([[2, 1]]))
    vis = Visibility.for_queries(12, 2, mask=mask)
    got = segment_attention(q, [seg, padded], k[..., :0, :], v[..., :0, :], visibility=vis, tail_start=12)
    for h in range(2):
        n = int(lengths[0, h])
        ok = mask[0, 0][:, keep[h, :n]]                                          # [2, n]
        s = (q[0, 2 * h:2 * h + 2] @ k[0, h, keep[h, :n]].T) * d ** -0.5
        want = torch.softmax(s.masked_fill(~ok, float("-inf")), -1) @ v[0, h, keep[h, :n]]
        torch.testing.assert_close(got[0, 2 * h:2 * h + 2], want, rtol=1e-5, atol=1e-5)


def _mistral(seed=0):
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=32, sliding_window=WINDOW, max_position_embeddings=256)).eval()


def _gemma3(seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                              head_dim=256, sliding_window=WINDOW, max_position_embeddings=256,
                                              layer_types=["sliding_attention", "sliding_attention",
                                                           "full_attention"])).eval()


@torch.no_grad()
@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_coded_sliding_layers_drop_pages_and_stay_close_to_eager(arch):
    """Coded pages (sphkv-8) on Mistral (head_dim 32, all sliding) and Gemma-3 (head_dim 256, MQA, 2 sliding + 1 global)."""
    model = {"mistral": _mistral, "gemma3": _gemma3}[arch]()
    ids = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(7))
    model.set_attn_implementation("eager")
    want = model(ids).logits
    model.set_attn_implementation(sphkv_hf.install())
    cfg = SphKVConfig.from_name("sphkv-8", head_dim=model.config.head_dim, page_size=4)
    cache = SphKVCache(cfg)
    cuts = [0, 24] + list(range(25, 61))
    got = torch.cat([model(ids[:, a:b], past_key_values=cache).logits for a, b in zip(cuts, cuts[1:])], 1)
    assert _rel(got, want) < 2e-2
    for layer in cache.layers:
        held = sum(s.num_tokens for s in layer.segments) + layer.tail_k.shape[-2]
        assert all(isinstance(s, CodedSegment) for s in layer.segments)
        if layer.sliding_window is None:
            assert held == 60
            continue
        assert WINDOW - 1 <= held <= WINDOW - 1 + 4
        assert int(layer.segments[0].positions.min()) >= 60 - WINDOW + 1 - 4
    if arch == "mistral":
        assert 0 < cache.bits_per_element() < 16 * (WINDOW + 4) / 60     # bytes of the window only


@torch.no_grad()
def test_rdr_plans_only_global_layers_of_a_sliding_model():
    model = _gemma3()
    model.set_attn_implementation(sphkv_hf.install())
    ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(8))
    cache = SphKVCache(None, policy=CachePolicy(mode="dense", observe_window=8))
    model(ids[:, :64], past_key_values=cache)
    assert [l.sliding_window for l in cache.layers] == [WINDOW, WINDOW, None]
    window_bytes = sum(cache.layers[i].stored_bytes() for i in (0, 1))
    budget = window_bytes + 50_000                          # the global layer alone: 65,536 B in bf16
    res = compress_cache(cache, budget_bytes=budget, variant="dense+rdr", page_size=8)
    assert cache.retention_layers == (2,) and res.store.num_layers == 1
    assert cache.stored_bytes() == res.stored_bytes + window_bytes <= budget
    assert all(l.tail_k.shape[-2] == WINDOW - 1 for l in cache.layers[:2])   # windows untouched
    rp = Replanner(cache, ReplanConfig(budget_bytes=budget, every=2, sinks=4))
    out = []
    for t in range(64, 70):                                                 # decode with re-planning
        out.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
        rp.step()
    rp.close()
    assert len(rp.reports) == 3 and all(bool(torch.isfinite(o).all()) for o in out)
    assert cache.get_seq_length() == 70 and cache.stored_bytes() <= budget
    assert cache.layers[0].key_mass_hook is None and all(l.tail_k.shape[-2] == WINDOW - 1 for l in cache.layers[:2])
    with pytest.raises(ValueError, match="windows alone take"):
        c2 = SphKVCache(None, policy=CachePolicy(mode="dense", observe_window=8))
        model(ids[:, :64], past_key_values=c2)
        compress_cache(c2, budget_bytes=window_bytes // 2, page_size=8)


class _Attn(torch.nn.Module):
    def __init__(self, layer_idx=3, is_causal=True):
        super().__init__()
        self.layer_idx, self.is_causal = layer_idx, is_causal


@pytest.mark.parametrize("module,kwargs,match", [
    (_Attn(), dict(s_aux=torch.zeros(4)), r"layer 3 \(_Attn\): attention sinks"),
    (_Attn(), dict(cu_seq_lens_q=torch.tensor([0, 3])), r"layer 3 .*packed variable-length"),
    (_Attn(is_causal=False), {}, r"layer 3 .*non-causal attention"),
    (_Attn().train(), dict(dropout=0.1), r"layer 3 .*attention dropout in training"),
    (_Attn(), dict(attention_mask=torch.full((1, 1, 3, 3), 0.5)), r"layer 3 .*additive attention bias"),
    (_Attn(), dict(attention_mask=torch.ones(1, 4, 3, 3, dtype=torch.bool)), r"layer 3 .*one mask shared"),
])
def test_features_it_cannot_honour_are_refused_naming_layer_and_feature(module, kwargs, match):
    q, k = _rand(1, 4, 3, 16), _rand(1, 2, 3, 16)
    kwargs = {"attention_mask": None, **kwargs}
    with pytest.raises(NotImplementedError, match=match):
        sphkv_attention_forward(module, q, k, k, **kwargs)


def test_a_model_with_attention_sinks_is_refused_at_the_first_forward():
    from transformers import GptOssConfig, GptOssForCausalLM
    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                           sliding_window=8, max_position_embeddings=256)).eval()
    model.set_attn_implementation(sphkv_hf.install())
    with pytest.raises(NotImplementedError, match=r"layer 0 \(GptOssAttention\): attention sinks"):
        model(torch.zeros(1, 5, dtype=torch.long), past_key_values=SphKVCache(None))


def test_segments_without_positions_need_a_prefix_every_query_sees():
    d = 16
    k, v, q = _rand(1, 2, 10, d, seed=9), _rand(1, 2, 10, d, seed=10), _rand(1, 4, 2, d, seed=11)
    seg = DenseSegment.build(k[..., :8, :], v[..., :8, :])                     # built by hand: no positions
    qp, kp = torch.arange(8, 10), torch.arange(10)
    causal = (kp[None, :] <= qp[:, None])[None, None]
    got = segment_attention(q, [seg], k[..., 8:, :], v[..., 8:, :], tail_start=8,
                            visibility=Visibility.for_queries(10, 2, mask=causal))
    torch.testing.assert_close(got, segment_attention(q, [seg], k[..., 8:, :], v[..., 8:, :]), rtol=1e-6, atol=1e-6)
    assert Visibility.for_queries(10, 2, window=10).sees_all_before(8)
    assert not Visibility.for_queries(10, 2, window=9).sees_all_before(8)  # query 9 no longer sees position 0
    with pytest.raises(ValueError, match="segment 0 .*carries no positions"):
        segment_attention(q, [seg], k[..., 8:, :], v[..., 8:, :], tail_start=8,
                          visibility=Visibility.for_queries(10, 2, window=4))
