# SPDX-License-Identifier: Apache-2.0
"""Head-tiered ADA (issue 12): the bits cap holds with every byte counted, the head table is deterministic and
measures what it says, and a head the table ranks first is stored at the high tier."""
from __future__ import annotations

import json
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.quality.ada import Ada
from benchmarks.quality.heads import TABLE, head_order, head_scores, load_table, needle_attention, value_positions
from benchmarks.quality.methods import PrefillContext
from benchmarks.quality.methods_heads import HeadTiered
from benchmarks.quality.retrieval import Question
from sphkv.headtiers import (HEAD_PRESETS, HeadTierPreset, bits_per_element, bits_per_visible_element, cache_bytes,
                             head_tiers, stored_tokens, visible_tokens)
from sphkv_hf.segments import CodedSegment

PRESET = HEAD_PRESETS["sphkv-rh4.5"]


def _ctx(layers: int, hkv: int, n: int, d: int, seed: int = 0) -> PrefillContext:
    g = torch.Generator().manual_seed(seed)
    ks = [(torch.randn(1, hkv, n, d, generator=g) * 3 + 1).to(torch.bfloat16) for _ in range(layers)]
    vs = [torch.randn(1, hkv, n, d, generator=g).to(torch.bfloat16) for _ in range(layers)]
    cfg = types.SimpleNamespace(model_type="test", num_hidden_layers=layers, num_key_value_heads=hkv)
    return PrefillContext(ks, vs, [None] * layers, cfg)


def _table(layers: int, hkv: int, seed: int = 1) -> dict:
    scores = torch.rand(layers, hkv, generator=torch.Generator().manual_seed(seed))
    return {"order": [list(p) for p in head_order(scores)]}


@pytest.mark.parametrize("head_dim,layers,hkv,n", [(64, 5, 3, 1500), (256, 18, 1, 901), (64, 30, 3, 2048),
                                                   (256, 18, 1, 4096)])
def test_bits_within_cap_every_byte_counted(head_dim, layers, hkv, n):
    """At head_dim 64 and 256 the lifted heads keep the whole cache ≤ 4.5 bits/element, one more would not, and the
    built prefix's exact bytes (pages, metadata, dense sinks) equal the accounting."""
    order = [tuple(p) for p in _table(layers, hkv)["order"]]
    tiers = head_tiers(PRESET, order, num_layers=layers, num_kv_heads=hkv, num_tokens=n, head_dim=head_dim)
    k = int((tiers == 0).sum())
    assert [tuple(p) for p in (tiers == 0).nonzero().tolist()] == sorted(order[:k])      # a prefix of the ranking
    ts = PRESET.tierset(head_dim)
    shape = dict(page_bytes=tuple(ts.page_bytes()), page_size=ts.page_size, kept=[n] * layers, num_tokens=n,
                 head_dim=head_dim, dense_sinks=PRESET.dense_sinks)
    dims = dict(num_layers=layers, num_kv_heads=hkv, num_tokens=n, head_dim=head_dim)
    assert k >= 1 and bits_per_element(cache_bytes(tiers == 0, **shape), **dims) <= 4.5
    if k < layers * hkv:
        one_more = tiers == 0
        one_more[order[k]] = True
        assert bits_per_element(cache_bytes(one_more, **shape), **dims) > 4.5
    if n <= 1500:                                     # build it: the stored bytes are the accounting's
        ctx = _ctx(layers, hkv, n, head_dim)
        prefix = HeadTiered(PRESET, table={"order": [list(p) for p in order]}).build(ctx)
        assert prefix.nbytes == cache_bytes(tiers == 0, **shape)
        assert prefix.bits_per_element <= 4.5


def test_window_only_keeps_what_a_later_query_sees():
    """With ``window_only`` (``sphkv-rh4.5w``) a sliding layer stores exactly the pages of a full layer's grid that hold
    one of its last ``window - 1`` tokens (no sinks), a global layer all tokens; the bytes are the accounting's, the
    cap holds per visible element, and a kept token has the codes it has in the plain preset's cache."""
    layers, hkv, n, d, w = 3, 1, 1000, 256, 257        # visible 256 from token 744: pages from 4 + 11 * 64 = 708
    ctx = _ctx(layers, hkv, n, d, seed=2)
    ctx.model_config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    ctx.model_config.sliding_window = w
    m = HeadTiered(HEAD_PRESETS["sphkv-rh4.5w"], table={"order": [[1, 0], [0, 0], [2, 0]]})
    prefix = m.build(ctx)
    assert m.visible(ctx) == [w - 1, n, w - 1] and m.kept(ctx) == [n - 708, n, n - 708]
    for l, segs in enumerate(prefix.segments):
        pos = torch.cat([s.positions[0, 0, :int(s.lengths[0, 0]) if s.lengths is not None else None] for s in segs])
        want = torch.arange(708, n) if l != 1 else torch.arange(n)
        assert torch.equal(pos.sort().values, want)
    ts = PRESET.tierset(d)
    shape = dict(page_bytes=tuple(ts.page_bytes()), page_size=ts.page_size, kept=m.kept(ctx), num_tokens=n,
                 head_dim=d, dense_sinks=PRESET.dense_sinks)
    assert prefix.nbytes == cache_bytes(m.last_tiers == 0, **shape)
    vis = m.extra_row()["bits_per_visible_element"]              # bytes over the visible elements only
    assert vis == prefix.nbytes * 8 / ((2 * (w - 1) + n) * hkv * d * 2) and prefix.bits_per_element < vis <= 4.5
    plain = _ctx(layers, hkv, n, d, seed=2)                       # no layer_types: every layer global, all kept
    assert m.kept(plain) == [n] * layers
    uni = HeadTiered(HeadTierPreset(base="sphkv-4", high="sphkv-4", max_bits=5.0, window_only=True), table=_table(3, 1))
    got, ref = uni.build(ctx), Ada("sphkv-4", sink=4).build(ctx)
    for l in (0, 2):                                              # sliding: the plain cache's codes of tokens 708..
        a = next(s for s in got.segments[l] if isinstance(s, CodedSegment))
        b = next(s for s in ref.segments[l] if isinstance(s, CodedSegment))
        assert torch.equal(a.kcode.codes[..., :n - 708, :], b.kcode.codes[..., 708 - 4:, :])
    assert stored_tokens(n, [w - 1, n, 3, 0, n - 4, n - 5], page_size=64, dense_sinks=4) == [n - 708, n, 36, 0, n, n]


GEMMA_GLOBAL = (5, 11, 17)                      # gemma-3-270m: 18 layers, window 512, one kv head, head_dim 256


@pytest.mark.parametrize("n", [2048, 4096, 1337])
def test_window_only_cap_binds_per_visible_element(n):
    """On a config with sliding layers the window-only cap is on bits per *visible* element (what the model's own
    full cache holds): sphkv-8 everywhere is ~2-3 bits per stored-token-slot element (the old convention, which let
    every layer be lifted) but ~7.9 per visible element, so the cap lifts only some pairs, every pair left out would
    cross it, and a preset whose base is already sphkv-8 is refused. Without sliding layers both conventions agree."""
    layers, hkv, d = 18, 1, 256
    windows = [None if l in GEMMA_GLOBAL else 512 for l in range(layers)]
    visible = visible_tokens(n, windows)
    order = [(5, 0), (11, 0), (17, 0)] + [(l, 0) for l in range(layers) if l not in GEMMA_GLOBAL]
    pre = HEAD_PRESETS["sphkv-rh4.5w"]
    ts = pre.tierset(d)
    kept = stored_tokens(n, visible, page_size=ts.page_size, dense_sinks=pre.dense_sinks)
    shape = dict(page_bytes=tuple(ts.page_bytes()), page_size=ts.page_size, kept=kept, num_tokens=n, head_dim=d,
                 dense_sinks=pre.dense_sinks)
    dims = dict(num_layers=layers, num_kv_heads=hkv, num_tokens=n, head_dim=d)

    def vis(high):
        return bits_per_visible_element(cache_bytes(high, **shape), visible=visible, num_kv_heads=hkv, head_dim=d)

    every = torch.ones(layers, hkv, dtype=torch.bool)
    assert bits_per_element(cache_bytes(every, **shape), **dims) < 4.5 < 7.5 < vis(every)
    tiers = head_tiers(pre, order, num_layers=layers, num_kv_heads=hkv, num_tokens=n, head_dim=d, kept=kept,
                       visible=visible)
    high = tiers == 0
    assert 0 < int(high.sum()) < layers and vis(high) <= 4.5
    for l, h in order:                                # greedy in rank order: no pair left out still fits
        if not high[l, h]:
            more = high.clone()
            more[l, h] = True
            assert vis(more) > 4.5
    eight = HeadTierPreset(base="sphkv-8", high="sphkv-8", max_bits=4.5, window_only=True)
    with pytest.raises(ValueError, match="bits/visible element"):
        head_tiers(eight, order, num_layers=layers, num_kv_heads=hkv, num_tokens=n, head_dim=d, kept=kept,
                   visible=visible)
    full = [n] * layers                               # no sliding layers: the same tiers and the same number
    a = head_tiers(pre, order, num_layers=layers, num_kv_heads=hkv, num_tokens=n, head_dim=d, kept=full)
    b = head_tiers(HEAD_PRESETS["sphkv-rh4.5"], order, num_layers=layers, num_kv_heads=hkv, num_tokens=n, head_dim=d)
    assert torch.equal(a, b)
    nb = cache_bytes(a == 0, **{**shape, "kept": full})
    assert bits_per_visible_element(nb, visible=full, num_kv_heads=hkv, head_dim=d) == pytest.approx(
        bits_per_element(nb, **dims), rel=1e-12)


def test_all_base_equals_the_plain_preset():
    """With no head lifted the head-tiered cache is sphkv-4b+sink: the same codes; the store counts the partial last
    page whole (its allocated bytes), the segment of the plain preset only its used slots."""
    ctx = _ctx(2, 2, 1021, 64)
    lo = HeadTierPreset(base="sphkv-4b", high="sphkv-8", max_bits=4.4)       # no room for a head at sphkv-8
    got = HeadTiered(lo, table=_table(2, 2)).build(ctx)
    ref = Ada("sphkv-4b", sink=4).build(ctx)
    slots = 2 * 2 * (-1017 % 64)                          # 2 layers x 2 heads, unused slots of the last page
    assert 0 < got.nbytes - ref.nbytes <= slots * 4104 / 64
    for a, b in zip(got.segments, ref.segments):
        ca = [s for s in a if isinstance(s, CodedSegment)]
        cb = [s for s in b if isinstance(s, CodedSegment)]
        assert len(ca) == len(cb) == 1
        assert torch.equal(ca[0].kcode.codes[..., :1017, :], cb[0].kcode.codes)


def test_table_head_gets_high_tier():
    """The pair the table ranks first is coded at sphkv-8 (its key error far below the base heads'), others at
    sphkv-4b; a pair outside the shape or named twice is refused."""
    layers, hkv, n, d = 3, 2, 1021, 64
    ctx = _ctx(layers, hkv, n, d, seed=4)
    order = [[2, 1], [0, 0]] + [[l, h] for l in range(layers) for h in range(hkv) if [l, h] not in ([2, 1], [0, 0])]
    tight = HeadTierPreset(base="sphkv-4b", high="sphkv-8", max_bits=5.2)      # room for one pair of six
    m = HeadTiered(tight, table={"order": order})
    prefix = m.build(ctx)
    assert (m.last_tiers == 0).nonzero().tolist() == [[2, 1]]
    err = {}
    for l in range(layers):
        coded = [s for s in prefix.segments[l] if isinstance(s, CodedSegment)]
        for seg in coded:                              # one segment per non-empty tier; lengths per head
            k_hat = seg.kcodec.decode(seg.kcode)                       # [1, Hkv, slots, d]
            for h in range(hkv):
                cnt = int(seg.lengths[0, h])
                if cnt:
                    pos = seg.positions[0, h, :cnt]
                    ref = ctx.keys[l][0, h, pos].float()
                    err[(l, h)] = float((k_hat[0, h, :cnt] - ref).norm() / ref.norm())
        lengths = {int(h): int(x) for seg in coded for h, x in enumerate(seg.lengths[0]) if x}
        assert sum(lengths.values()) == hkv * (n - 4)
    assert len(err) == layers * hkv
    assert err[(2, 1)] < 0.2 * min(v for p, v in err.items() if p != (2, 1))
    with pytest.raises(ValueError, match="outside"):
        head_tiers(tight, [(3, 0)], num_layers=layers, num_kv_heads=hkv, num_tokens=n, head_dim=d)
    with pytest.raises(ValueError, match="twice"):
        head_tiers(tight, [(0, 0), (0, 0)], num_layers=layers, num_kv_heads=hkv, num_tokens=n, head_dim=d)
    with pytest.raises(ValueError, match="over max_bits"):
        head_tiers(HeadTierPreset(base="sphkv-4b", high="sphkv-8", max_bits=3.0), [], num_layers=layers,
                   num_kv_heads=hkv, num_tokens=n, head_dim=d)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def test_needle_attention_is_the_models_attention_and_deterministic():
    """needle_attention (prefill, then each question over a copy of the cache) equals the attention probabilities of
    one cache-less eager forward over haystack + question + answer, and two runs give the same table."""
    model = _tiny_llama()
    g = torch.Generator().manual_seed(5)
    hay = torch.randint(10, 96, (150,), generator=g)
    value = torch.tensor([3, 4, 5])
    hay[60:63] = value                                          # the needle's value at depth 60/150
    q = Question("single", torch.randint(10, 96, (7,), generator=g), value.clone(), [(0, 3)], [60 / 150])
    assert value_positions(hay, value, 60 / 150).tolist() == [60, 61, 62]
    mass, found, total = needle_attention(model, hay, [q])
    again, _, _ = needle_attention(model, hay, [q])
    assert (found, total) == (1, 1) and torch.equal(mass, again)
    model.set_attn_implementation("eager")
    full = torch.cat([hay, q.question, q.answer])
    att = model(input_ids=full[None], output_attentions=True).attentions
    r0 = hay.numel() + q.question.numel() - 1
    ref = torch.stack([a[0, :, r0:r0 + 3, 60:63].sum(-1).mean(-1) for a in att]).double()   # [L, Hq]
    assert torch.allclose(mass[0], ref, atol=1e-5)
    scores = head_scores(mass, 2)
    assert torch.allclose(scores, ref.view(2, 2, 2).amax(-1))
    assert head_order(scores) == head_order(scores.clone())


def test_committed_table_covers_both_models():
    """The committed table was made by benchmarks.quality.heads on the essays for both harness models, every
    needle value located, and its order is the order of its scores."""
    data = json.loads(TABLE.read_text())
    for name, (layers, hkv) in {"smollm2": (30, 3), "gemma3": (18, 1)}.items():
        t = data[name]
        assert t["corpus"] == "essays" and t["values_found"] == t["values_total"] > 0
        assert [tuple(p) for p in t["order"]] == head_order(torch.tensor(t["scores"]))
        assert len(t["order"]) == layers * hkv
        cfg = types.SimpleNamespace(model_type=t["model_type"], num_hidden_layers=layers, num_key_value_heads=hkv)
        assert load_table(cfg) == t
    with pytest.raises(ValueError, match="no retrieval-head table"):
        load_table(types.SimpleNamespace(model_type="nope", num_hidden_layers=1, num_key_value_heads=1))
