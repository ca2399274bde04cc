# SPDX-License-Identifier: Apache-2.0
"""RDR in the transformers cache (compress after prefill, re-plan in decode) and the harness's RDR rows."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sphkv_hf
from sphkv_hf import CachePolicy, CodedSegment, DenseSegment, SphKVCache, segment_attention
from sphkv.retention import RetentionConfig
from sphkv_hf.retention import ReplanConfig, Replanner, compress_cache, store_segments

HD, N, W, P = 16, 320, 16, 16
CFG = RetentionConfig(recent=8)          # 4 sinks + 8 recent tokens protected: one page per head


def _tiny(vocab: int = 128, head_dim: int = HD, kv: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv, head_dim=head_dim,
                      max_position_embeddings=1024)
    m = LlamaForCausalLM(cfg).eval()
    m.set_attn_implementation(sphkv_hf.install())
    return m


@pytest.fixture(scope="module")
def model():
    return _tiny()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (1, N + 8), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _prefill(model, ids) -> SphKVCache:
    cache = SphKVCache(None, policy=CachePolicy(mode="dense", observe_window=W))
    model(input_ids=ids[:, :N], past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("variant", ["ada+rdr", "rdkv", "dense+rdr"])
@pytest.mark.parametrize("fraction", [0.10, 0.25, 0.5])
def test_compress_respects_budget_exactly(model, ids, variant, fraction):
    cache = _prefill(model, ids)
    res = compress_cache(cache, fraction, variant=variant, page_size=P, config=CFG)
    assert res.stored_bytes <= res.plan.budget_bytes <= fraction * res.bf16_bytes
    assert cache.stored_bytes() == res.stored_bytes == res.store.bytes().stored_bytes
    assert cache.get_seq_length() == N
    for l, layer in enumerate(cache.layers):
        assert layer.tail_k.shape[-2] == 0
        assert sum(s.nbytes for s in layer.segments) == int(res.store.bytes_per_head()[l].sum())
        kinds = {type(s) for s in layer.segments}
        if variant == "ada+rdr" and res.plan.summary()["tokens_per_tier"]["sphkv-4"]:
            assert CodedSegment in kinds


def test_compress_budget_bytes_and_bad_budgets(model, ids):
    cache = _prefill(model, ids)
    res = compress_cache(cache, budget_bytes=20_000, page_size=P, config=CFG)
    assert cache.stored_bytes() == res.stored_bytes <= 20_000
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="budget"):
            compress_cache(_prefill(model, ids), bad, page_size=P, config=CFG)
    with pytest.raises(ValueError, match="observe_window"):
        c = SphKVCache(None, policy=CachePolicy(mode="dense"))
        model(input_ids=ids[:, :N], past_key_values=c)
        compress_cache(c, 0.25, config=CFG)


def _reference_attention(q, store, layer):
    """Per kv head: plain softmax attention over the store's decoded kept tokens."""
    hq, hkv = q.shape[1], store.num_kv_heads
    g, out = hq // hkv, torch.zeros_like(q)
    for h in range(hkv):
        _, k, v, _ = store.gather(layer, h)
        qh = q[0, h * g:(h + 1) * g]                                        # [G, M, d]
        out[0, h * g:(h + 1) * g] = torch.softmax(qh @ k.T * q.shape[-1] ** -0.5, -1) @ v
    return out


@pytest.mark.parametrize("variant", ["ada+rdr", "rdkv", "dense+rdr"])
def test_attention_over_segments_equals_decoded_tokens(model, ids, variant):
    cache = _prefill(model, ids)
    res = compress_cache(cache, 0.25, variant=variant, page_size=P, config=CFG)
    q = torch.randn(1, 4, 3, HD, generator=torch.Generator().manual_seed(5))
    for l, layer in enumerate(cache.layers):
        tail = layer.tail_k
        got = segment_attention(q, layer.segments, tail, tail, causal=False)
        want = _reference_attention(q, res.store, l)
        assert torch.allclose(got, want, atol=2e-4, rtol=1e-3), float((got - want).abs().max())
        assert torch.allclose(got, res.attention(l, q), atol=2e-4, rtol=1e-3)


def test_coded_segment_page_means_line_up(model, ids):
    """A head's kept tokens of an ADA tier are its pages back to back: slot i of the segment is slot i % P of page i // P."""
    cache = _prefill(model, ids)
    res = compress_cache(cache, 0.25, page_size=P, config=CFG)
    store = res.store
    for l in range(store.num_layers):
        for seg in store_segments(store, l):
            if not isinstance(seg, CodedSegment):
                continue
            k_seg = seg.kcodec.decode(seg.kcode)                            # [1, Hkv, m*P, d] via page grid
            for h in range(store.num_kv_heads):
                n = int(seg.lengths[0, h])
                pos = seg.positions[0, h, :n]
                gpos, gk, _, _ = store.gather(l, h)
                idx = torch.searchsorted(gpos, pos)
                assert torch.equal(gpos[idx], pos)
                assert torch.allclose(k_seg[0, h, :n], gk[idx], atol=1e-3, rtol=1e-3)


@torch.no_grad()
def test_generation_after_compression_keeps_positions(model, ids):
    cache = _prefill(model, ids)
    res = compress_cache(cache, 0.5, variant="dense+rdr", page_size=P, config=CFG)
    # reference: dense segments gathered from the original prefill K/V at the kept positions (original RoPE)
    dense = _prefill(model, ids)
    ref_prefix = []
    for l, layer in enumerate(dense.layers):
        k, v = (x.to(torch.bfloat16) for x in layer.dense_kv())            # the dense tier stores bf16
        segs = []
        for s in store_segments(res.store, l):
            pos = s.positions.clamp_min(0)[..., None].expand(-1, -1, -1, HD)
            segs.append(DenseSegment(s.nbytes, k=k.gather(2, pos), v=v.gather(2, pos), lengths=s.lengths))
        ref_prefix.append(segs)
    out = model.generate(ids[:, :N + 1], past_key_values=cache, max_new_tokens=6, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    ref = SphKVCache.from_prefix(ref_prefix, N)
    tok, logits = ids[:, N:N + 1], []
    for step in range(6):
        lg = model(input_ids=tok, position_ids=torch.tensor([[N + step]]), past_key_values=ref).logits[0, -1]
        logits.append(lg)
        tok = lg.argmax()[None, None]
    assert torch.allclose(torch.stack(list(out.scores))[:, 0], torch.stack(logits), atol=1e-4)
    assert cache.get_seq_length() == N + 6
    # positions are observable: the same query at the kept-token count as position gives other logits
    kept = int(res.plan.summary()["tokens_per_tier"]["dense"]) // (2 * 2)
    shifted = SphKVCache.from_prefix(ref_prefix, N)
    lg = model(input_ids=ids[:, N:N + 1], position_ids=torch.tensor([[kept]]), past_key_values=shifted).logits[0, -1]
    assert not torch.allclose(lg, logits[0], atol=1e-3)


@torch.no_grad()
def test_replanner_keeps_budget_during_decode(model, ids):
    cache = _prefill(model, ids)
    res = compress_cache(cache, 0.5, page_size=P, config=CFG)
    budget = res.stored_bytes                                   # decode tokens must be paid for by the prefix
    rp = Replanner(cache, ReplanConfig(budget_bytes=budget, every=4))
    tok = ids[:, N:N + 1]
    for step in range(8):
        lg = model(input_ids=tok, position_ids=torch.tensor([[N + step]]), past_key_values=cache).logits[0, -1]
        tok = lg.argmax()[None, None]
        if rp.step():
            assert cache.stored_bytes() <= budget
            res.store.check()
    assert len(rp.reports) == 2 and rp.reports[-1].bytes_after < rp.reports[0].bytes_before
    assert torch.isfinite(lg).all() and cache.get_seq_length() == N + 8
    assert rp.tracker.utility().shape[-1] == N + 8
    rp.close()
    with pytest.raises(ValueError, match="budget_bytes"):
        ReplanConfig(budget_bytes=0)


def test_registered_rdr_methods_produce_rows():
    from benchmarks.quality.run import _row, essay_ids, load_methods
    from benchmarks.quality.tasks import ContextTask
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sphkv_hf.ensure_model())
    model = _tiny(vocab=len(tok), head_dim=64, kv=1)
    reg = load_methods()
    for f in ("0.05", "0.10", "0.25", "0.50"):
        assert {f"ada+rdr@{f}", f"ada+rdr-v0@{f}", f"rdkv@{f}", f"dense+rdr@{f}"} <= set(reg)
    assert all(reg[n].quick for n in ("ada+rdr@0.10", "ada+rdr@0.25"))
    task = ContextTask(model, tok, essay_ids(tok, 1024 + 33), 1024, score_len=32)
    ref = task.run(reg["full"].factory())
    keys = {"model", "corpus", "method", "bits_per_element", "context", "nll", "nll_delta_pct", "needle_hit_rate",
            "retrieval_rate", "answer_nll", "logit_rel_err", "budget_fraction", "metadata_overhead_pct", "plan_source"}
    for name in ("ada+rdr@0.10", "ada+rdr@0.25", "rdkv@0.25", "dense+rdr@0.10"):
        m = reg[name].factory()
        row = _row(name, reg[name], m, 1024, task.run(m), ref, 0.0, "tiny", "essays")
        assert keys <= set(row) and row["retrieval_cases"] == 24
        assert row["bits_per_element"] <= 16 * float(name.split("@")[1]) + 1e-9
        assert 0 < row["metadata_overhead_pct"] < 5 and row["stored_bytes"] <= row["budget_bytes"]
