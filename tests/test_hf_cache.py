# SPDX-License-Identifier: Apache-2.0
"""The sphkv transformers cache on a tiny random Llama, and its segments/attention/accounting."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import sphkv_hf
from sphkv import AngleKeyCodec, GroupValueQuantizer, SphKVConfig, attention_from_codes
from sphkv_hf import CachePolicy, CodedSegment, DenseSegment, SphKVCache, segment_attention

HD = 16


def _tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=HD, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _cfg(**kw) -> SphKVConfig:
    base = dict(head_dim=HD, level_bits=(4, 3, 3, 2), value_bits=4, value_group=8, page_size=4)
    return SphKVConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    m = _tiny_model()
    m.set_attn_implementation(sphkv_hf.install())
    return m


def test_install_registers_and_import_patches_nothing():
    from transformers import AttentionInterface

    name = sphkv_hf.install()
    assert name == "sphkv" and AttentionInterface._global_mapping[name] is sphkv_hf.sphkv_attention_forward
    # "patches nothing": in a fresh interpreter, importing sphkv_hf (and building a SphKVCache) leaves
    # every function and class attribute of transformers' attention/cache/model modules as it was, and
    # registers no attention function until install() is called.
    import subprocess
    import sys

    probe = """
import importlib, json, sys
import transformers
from transformers import AttentionInterface
MODS = ["transformers.cache_utils", "transformers.modeling_utils", "transformers.masking_utils",
        "transformers.integrations.sdpa_attention", "transformers.models.llama.modeling_llama",
        "transformers.generation.utils"]
def snap():
    out = {"attn": sorted(AttentionInterface._global_mapping)}
    for name in MODS:
        mod = importlib.import_module(name)
        for attr, obj in sorted(vars(mod).items()):
            out[f"{name}.{attr}"] = id(obj)
            if isinstance(obj, type) and obj.__module__ == name:
                for key, val in sorted(vars(obj).items()):
                    out[f"{name}.{attr}.{key}"] = id(val)
    return out
before = snap()
import sphkv_hf
sphkv_hf.SphKVCache(None)
after = snap()
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
sphkv_hf.install()
print(json.dumps({"changed": changed, "n": len(before), "installed": "sphkv" in AttentionInterface._global_mapping}))
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n"] > 500 and res["changed"] == [] and res["installed"], res


def test_dense_cache_generation_equals_hf_default(model):
    ids = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(1))
    ref = _tiny_model()
    want = ref.generate(ids, max_new_tokens=12, do_sample=False)            # stock sdpa + DynamicCache
    cache = SphKVCache(None)
    got = model.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False)
    assert torch.equal(want, got)
    assert cache.bits_per_element() == 16.0


def test_sphkv8_greedy_equals_dense_and_codes_pages(model):
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    dense = model.generate(ids, past_key_values=SphKVCache(None), max_new_tokens=16, do_sample=False)
    cfg = SphKVConfig.from_name("sphkv-8", head_dim=HD, page_size=8, value_group=16)
    cache = SphKVCache(cfg)
    got = model.generate(ids, past_key_values=cache, max_new_tokens=16, do_sample=False)
    assert torch.equal(dense, got)
    layer = cache.layers[0]
    assert isinstance(layer.segments[0], CodedSegment) and layer.segments[0].num_tokens == 40
    assert layer.tail_k.shape[-2] == 45 - 40 and cache.get_seq_length() == 45


def test_low_bit_generation_runs(model):
    ids = torch.randint(0, 128, (1, 19), generator=torch.Generator().manual_seed(3))
    cache = SphKVCache(_cfg(level_bits=(2, 1, 1, 1), value_bits=2))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=9, do_sample=False)
    assert out.shape == (1, 28) and bool((out >= 0).all())
    assert 0 < cache.bits_per_element() < 16


def test_no_cache_forward_falls_back_to_dense_sdpa(model):
    ids = torch.randint(0, 128, (1, 17), generator=torch.Generator().manual_seed(5))
    want = _tiny_model()(ids, use_cache=False).logits
    got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_beam_search_is_refused(model):
    with pytest.raises(NotImplementedError):
        model.generate(torch.randint(0, 128, (1, 5)), past_key_values=SphKVCache(None), num_beams=2,
                       max_new_tokens=2, do_sample=False)


def test_wrong_attention_implementation_is_caught():
    m = _tiny_model()                                                       # stays on sdpa
    cache = SphKVCache(_cfg())
    ids = torch.randint(0, 128, (1, 5))
    m(ids, past_key_values=cache)
    with pytest.raises(RuntimeError, match="set_attn_implementation"):
        m(ids[:, :1], past_key_values=cache)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_segment_attention_matches_dense_over_decoded_keys():
    cfg = _cfg()
    kc, vq = AngleKeyCodec(cfg), GroupValueQuantizer(cfg)
    k, v = _rand(1, 2, 11, HD, seed=1) * 3, _rand(1, 2, 11, HD, seed=2)
    tk, tv = _rand(1, 2, 5, HD, seed=3), _rand(1, 2, 5, HD, seed=4)
    q = _rand(1, 4, 3, HD, seed=5)
    seg = CodedSegment.encode(k, v, kc, vq)
    got = segment_attention(q, [seg], tk, tv)
    # reference 1: sphkv.attention_from_codes (single coded prefix + dense tail)
    ref = attention_from_codes(q, seg.kcode, seg.vcode, kc, vq, dense_k=tk, dense_v=tv)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # reference 2: SDPA over the decoded keys/values, causal inside the tail
    kd = torch.cat([kc.decode(seg.kcode), tk], -2)
    vd = torch.cat([vq.decode(seg.vcode), tv], -2)
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[:, 11:] = torch.arange(5)[None, :] <= (2 + torch.arange(3))[:, None]
    sd = F.scaled_dot_product_attention(q, kd, vd, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, sd, rtol=1e-4, atol=1e-4)


def test_dense_fast_path_equals_general_path():
    k, v = _rand(1, 2, 9, HD, seed=6), _rand(1, 2, 9, HD, seed=7)
    tk, tv = _rand(1, 2, 4, HD, seed=8), _rand(1, 2, 4, HD, seed=9)
    q = _rand(1, 4, 4, HD, seed=10)
    segs = [DenseSegment.build(k[..., :5, :], v[..., :5, :]), DenseSegment.build(k[..., 5:, :], v[..., 5:, :])]
    fast = segment_attention(q, segs, tk, tv)
    general, mass = segment_attention(q, segs, tk, tv, return_key_mass=True)
    torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-5)
    total = sum(m.sum() for m in mass)
    assert abs(float(total) - 2 * 2 * 4) < 1e-4          # each of G*M=8 query rows per kv head sums to 1


def test_padded_rows_equal_attention_over_kept_tokens():
    cfg = _cfg()
    kc, vq = AngleKeyCodec(cfg), GroupValueQuantizer(cfg)
    k, v = _rand(1, 2, 10, HD, seed=11), _rand(1, 2, 10, HD, seed=12)
    lengths = torch.tensor([[10, 6]])
    seg = CodedSegment.encode(k, v, kc, vq, lengths=lengths)
    tk, tv, q = _rand(1, 2, 1, HD, seed=13), _rand(1, 2, 1, HD, seed=14), _rand(1, 4, 1, HD, seed=15)
    out = segment_attention(q, [seg], tk, tv)
    for h, n in enumerate((10, 6)):
        alone = CodedSegment.encode(k[:, h:h + 1, :n], v[:, h:h + 1, :n], kc, vq)
        want = segment_attention(q[:, 2 * h:2 * h + 2], [alone], tk[:, h:h + 1], tv[:, h:h + 1])
        torch.testing.assert_close(out[:, 2 * h:2 * h + 2], want, rtol=1e-5, atol=1e-5)
    per_row = [kc.stored_bytes(n) + vq.stored_bytes(n) + -(-n // 4) * 8 for n in (10, 6)]
    assert seg.nbytes == sum(per_row)


def test_bytes_accounting_hand_computed():
    # head_dim 16, level bits (4,3,3,2): 8·4 + 4·3 + 2·3 + 1·2 = 52 bits → 7 B codes + 2 B radius per key,
    # one bf16 mean per 4-token page = 32 B; values 4-bit: 8 B + 2 groups × (fp16 scale + zero) = 16 B per token;
    # 8 B metadata per page. 10 tokens → 2 coded pages + 2 dense tail tokens (16 × 2 B × 2 each).
    cache = SphKVCache(_cfg())
    for layer in range(2):
        k, _ = cache.update(_rand(1, 2, 10, HD, seed=layer), _rand(1, 2, 10, HD, seed=9 + layer), layer)
        k.sphkv_layer.attend(_rand(1, 4, 10, HD), None)
    per_head = 8 * (7 + 2) + 2 * 32 + 8 * 16 + 2 * 8 + 2 * HD * 2 * 2
    assert per_head == 408
    assert cache.stored_bytes() == 2 * 2 * 408 == 1632
    assert cache.bits_per_element() == pytest.approx(1632 * 8 / (10 * 2 * 2 * HD * 2))


def test_page_rollover_and_compress():
    cache = SphKVCache(_cfg(), policy=CachePolicy(dense_sink=4))
    steps = [6, 1, 1, 1, 4]
    tails, coded = [], []
    for i, m in enumerate(steps):
        k, _ = cache.update(_rand(1, 2, m, HD, seed=i), _rand(1, 2, m, HD, seed=50 + i), 0)
        k.sphkv_layer.attend(_rand(1, 4, m, HD, seed=99), None)
        layer = cache.layers[0]
        tails.append(layer.tail_k.shape[-2])
        coded.append(sum(s.num_tokens for s in layer.segments if isinstance(s, CodedSegment)))
    assert tails == [2, 3, 0, 1, 1]                   # partial page stays dense, full pages roll over
    assert coded == [0, 0, 4, 4, 8]                   # first page went to the dense sink segment
    layer = cache.layers[0]
    assert isinstance(layer.segments[0], DenseSegment) and layer.segments[0].num_tokens == 4
    assert len(layer.segments) == 2                   # rolled pages merged into one coded segment
    cache.compress()
    assert layer.tail_k.shape[-2] == 0 and sum(s.num_tokens for s in layer.segments) == 13
    assert cache.get_seq_length() == 13


def test_single_sink_token_then_aligned_pages():
    cache = SphKVCache(_cfg(), policy=CachePolicy(dense_sink=1))
    for i, m in enumerate([6, 3, 1]):
        k, _ = cache.update(_rand(1, 2, m, HD, seed=i), _rand(1, 2, m, HD, seed=20 + i), 0)
        k.sphkv_layer.attend(_rand(1, 4, m, HD, seed=7), None)
    layer = cache.layers[0]
    assert [s.num_tokens for s in layer.segments] == [1, 8] and layer.tail_k.shape[-2] == 1
    assert isinstance(layer.segments[0], DenseSegment) and layer.segments[0].nbytes == 2 * (HD * 4 + 8)


def test_from_prefix_with_dropped_tokens_keeps_positions(model):
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(4))
    full = SphKVCache(None, policy=CachePolicy(mode="dense"))
    model(ids, past_key_values=full)
    keep = torch.tensor([0, 1, 2, 3, 12, 13, 20, 21, 22, 23])                 # drop 14 of 24 tokens
    prefix = [[DenseSegment.build(*(t[..., keep, :] for t in layer.dense_kv()), page_size=4,
                                  positions=keep.expand(1, 2, -1))] for layer in full.layers]
    cache = SphKVCache.from_prefix(prefix, 24)
    assert cache.get_seq_length() == 24
    nxt = torch.tensor([[5]])
    out = model(nxt, position_ids=torch.tensor([[24]]), past_key_values=cache).logits
    assert out.shape == (1, 1, 128) and cache.get_seq_length() == 25
    # the same logits as attending over exactly the kept tokens with the dense reference path
    ref = SphKVCache.from_prefix([[DenseSegment.build(*(t[..., keep, :] for t in layer.dense_kv()))]
                                  for layer in full.layers], 24)
    want = model(nxt, position_ids=torch.tensor([[24]]), past_key_values=ref).logits
    torch.testing.assert_close(out, want)


def test_policy_validation_names_field():
    with pytest.raises(ValueError, match="mode="):
        CachePolicy(mode="lazy")
    with pytest.raises(ValueError, match="dense_sink="):
        CachePolicy(dense_sink=-2)
    with pytest.raises(ValueError, match="observe_window="):
        CachePolicy(observe_window=-1)


def test_observe_window_keeps_last_queries(model):
    cache = SphKVCache(None, policy=CachePolicy(mode="dense", observe_window=5))
    model(torch.randint(0, 128, (1, 9)), past_key_values=cache)
    model(torch.randint(0, 128, (1, 2)), past_key_values=cache)
    q = cache.layers[1].observed_queries
    assert q.shape == (1, 4, 5, HD) and q.dtype == torch.float32
