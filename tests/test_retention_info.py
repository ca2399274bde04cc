# SPDX-License-Identifier: Apache-2.0
"""Query-agnostic information scores for RDR: surprisal and KVzip-style reconstruction attention.

Unit tests on random odd sizes (shapes, normalization, pooling, determinism, bad input) against brute-force
references, the allocator keeping high-information tokens, and the harness's surprisal on the real model
(equal to a cache-less forward; a token the model cannot predict scores above one it can).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sphkv.retention import RetentionConfig, compress_variant
from sphkv.retention.utility import information_score, reconstruction_attention


def test_information_score_normalizes_pools_and_is_deterministic():
    g = torch.Generator().manual_seed(3)
    s = torch.rand(37, generator=g) * 5
    z = information_score(s)
    assert z.shape == (37,) and z.dtype == torch.float32
    assert float(z.mean()) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(z, s / s.mean(), atol=1e-6)
    pooled = information_score(s, kernel=5)
    ref = torch.stack([s[max(0, i - 2):i + 3].max() for i in range(37)])
    assert torch.allclose(pooled, ref / ref.mean(), atol=1e-6)
    sharp = information_score(s, kernel=3, power=2.0)
    ref3 = torch.stack([s[max(0, i - 1):i + 2].max() for i in range(37)]) ** 2
    assert torch.allclose(sharp, ref3 / ref3.mean(), atol=1e-5)
    assert torch.equal(information_score(s, kernel=5), pooled)                      # deterministic
    # per (layer, kv head) rows are normalized on their own; an all-zero row becomes all ones
    rows = torch.rand(3, 2, 11, generator=g)
    rows[1, 0] = 0
    zr = information_score(rows)
    assert zr.shape == (3, 2, 11)
    assert torch.allclose(zr.mean(-1), torch.ones(3, 2), atol=1e-6)
    assert torch.equal(zr[1, 0], torch.ones(11))


@pytest.mark.parametrize("bad,match", [
    (dict(score=torch.tensor([1.0, -0.5])), "finite and >= 0"),
    (dict(score=torch.tensor([1.0, float("nan")])), "finite and >= 0"),
    (dict(score=torch.ones(5), kernel=4), "kernel=4"),
    (dict(score=torch.ones(5), power=0.0), "power=0.0"),
    (dict(score=torch.ones(0)), "N>=1"),
])
def test_information_score_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        information_score(**bad)


def test_reconstruction_attention_matches_brute_force():
    g = torch.Generator().manual_seed(5)
    hkv, grp, n, extra, r, d = 3, 3, 13, 7, 5, 8                 # odd sizes; queries are the last r positions
    k = torch.randn(hkv, n + extra, d, generator=g)
    q = torch.randn(hkv * grp, r, d, generator=g)
    out = reconstruction_attention(k, q, n)
    assert out.shape == (hkv, n)
    ref = torch.zeros(hkv, n)
    total = n + extra
    for h in range(hkv * grp):
        for j in range(r):
            pos = total - r + j
            p = torch.softmax(q[h, j] @ k[h // grp, :pos + 1].T / d ** 0.5, -1)
            ref[h // grp] = torch.maximum(ref[h // grp], p[:n])
    assert torch.allclose(out, ref, atol=1e-6)
    # a key some repeat query copies from (its logit dominates) gets the top score
    k2 = k.clone()
    k2[1, 6] = q[3 * 1 + 2, 4] * 20
    assert int(reconstruction_attention(k2, q, n)[1].argmax()) == 6
    with pytest.raises(ValueError, match="num_context=16"):
        reconstruction_attention(k, q, 16)


def _prefill(num_layers=2, hkv=3, n=300, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(1, hkv, n, d, generator=g) for _ in range(num_layers)]
    vs = [torch.randn(1, hkv, n, d, generator=g) for _ in range(num_layers)]
    qs = [torch.randn(1, 3 * hkv, 16, d, generator=g) for _ in range(num_layers)]
    return ks, vs, qs


def test_allocator_keeps_the_high_information_tokens():
    ks, vs, qs = _prefill(n=601)
    info = torch.ones(601)
    info[200:240] = 40.0                                        # an unpredictable span in the middle
    base = RetentionConfig(floor=True, per_layer=False, prior=1.0, calib_tokens=128)
    cfg = dataclasses.replace(base, info_weight=8.0)
    res = compress_variant("ada-c+rdr", ks, vs, qs, 0.10, config=cfg, page_size=16, information=info)
    assert res.stored_bytes <= res.plan.budget_bytes and res.plan.drop < 10
    kept = res.plan.kept()                                      # [L, Hkv, N]
    assert bool(kept[..., 200:240].all())                       # the span is kept in every (layer, kv head)
    assert float(kept.float().mean()) < 0.6                     # ... while most tokens are dropped
    # the score per (layer, kv head) ([L, Hkv, N]) works the same way
    res2 = compress_variant("ada-c+rdr", ks, vs, qs, 0.10, config=cfg, page_size=16, calibration=res.calibration,
                            information=info.expand(2, 3, 601))
    assert torch.equal(res2.plan.tiers, res.plan.tiers)
    # info_weight 0 ignores the score: the plan is the one without it
    plain = compress_variant("ada-c+rdr", ks, vs, qs, 0.10, config=base, page_size=16, calibration=res.calibration)
    same = compress_variant("ada-c+rdr", ks, vs, qs, 0.10, config=base, page_size=16, calibration=res.calibration,
                            information=info)
    assert torch.equal(plain.plan.tiers, same.plan.tiers)
    assert not bool(plain.plan.kept()[..., 200:240].all())


def test_band_info_weight_replaces_info_weight_in_the_band():
    ks, vs, qs = _prefill()
    info = torch.rand(300, generator=torch.Generator().manual_seed(1)) * 10
    robust = RetentionConfig(floor=True, per_layer=False, prior=1.0, calib_tokens=128, spread=1, band_prior=4.0)
    ref = compress_variant("ada-c+rdr", ks, vs, qs, 0.25, config=robust, page_size=16)
    off = compress_variant("ada-c+rdr", ks, vs, qs, 0.25, config=dataclasses.replace(
        robust, info_weight=4.0, band_info_weight=0.0), page_size=16, calibration=ref.calibration, information=info)
    assert torch.equal(off.plan.tiers, ref.plan.tiers)          # at 25% the band applies: the score is not used


def test_config_and_input_errors_name_the_value():
    with pytest.raises(ValueError, match="info_weight=-1"):
        RetentionConfig(info_weight=-1.0)
    with pytest.raises(ValueError, match="info_kernel=4"):
        RetentionConfig(info_kernel=4)
    with pytest.raises(ValueError, match="info_power=0"):
        RetentionConfig(info_power=0.0)
    with pytest.raises(ValueError, match="band_info_weight=inf"):
        RetentionConfig(band_info_weight=float("inf"))
    ks, vs, qs = _prefill()
    cfg = RetentionConfig(info_weight=1.0, calib_tokens=128)
    with pytest.raises(ValueError, match="needs an information score"):
        compress_variant("ada-c+rdr", ks, vs, qs, 0.10, config=cfg, page_size=16)
    with pytest.raises(ValueError, match="information must be"):
        compress_variant("ada-c+rdr", ks, vs, qs, 0.10, config=cfg, page_size=16, information=torch.ones(299))


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("transformers")
    from benchmarks.quality.models import available_models, load_model

    if "smollm2" not in available_models():
        pytest.skip("smollm2 weights are not installed")
    torch.set_num_threads(1)
    return load_model("smollm2")


def _task(model, tok, ids):
    from benchmarks.quality.tasks import ContextTask

    task = ContextTask.__new__(ContextTask)        # the prefills only (no retrieval haystacks)
    task.model, task.tok, task.n, task.s, task.w, task.stride, task.sliding = model, tok, ids.numel(), 0, 8, 8, False
    task.ids = ids
    return task


def test_harness_surprisal_is_the_models_own_and_flags_unpredictable_tokens(smol):
    model, tok = smol
    phrase = tok(" The quick brown fox jumps over the lazy dog near the old river bank.",
                 add_special_tokens=False).input_ids
    rare = tok(" zebra", add_special_tokens=False).input_ids
    ids = torch.tensor(phrase + phrase + rare + phrase)                   # the second copy is predictable
    task = _task(model, tok, ids)
    ctx = task._prefill(ids[None], None, 0)
    s = ctx.surprisal()
    assert s.shape == (ids.numel(),) and float(s[0]) == 0.0
    own = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0].float()
    finally:
        model.set_attn_implementation(own)
    assert torch.allclose(s[1:], F.cross_entropy(logits[:-1], ids[1:], reduction="none"), atol=2e-3)
    p = len(phrase)
    assert float(s[p + 1:2 * p].mean()) < float(s[1:p].mean()) - 1.0     # a repeat is predictable
    assert float(s[2 * p]) > float(s[p + 1:2 * p].max())                 # "zebra" is not
    # a later prefill after a shared prefix (the harness's haystacks) continues the same scores
    start = p + 3
    cont = task._prefill(ids[None, start:], ctx, start)
    c = cont.surprisal()
    assert c.shape == s.shape and torch.equal(c[:start], s[:start])     # the shared prefix: the same scores
    assert float((c - s).abs().max()) < 0.25 and float((c - s).abs().mean()) < 0.02   # over a bf16 prefix
    # the reconstruction score: one repeat forward, [L, Hkv, N], computed once
    r = ctx.reconstruction()
    assert r.shape == (len(ctx.keys), ctx.num_kv_heads, ids.numel()) and bool((r >= 0).all())
    assert ctx.reconstruction() is r


def test_floor_policy_applies_below_the_floor_only():
    ks, vs, qs = _prefill(n=601)
    info = torch.rand(2, 3, 601, generator=torch.Generator().manual_seed(2))
    band = RetentionConfig(floor=True, per_layer=False, prior=1.0, calib_tokens=128, spread=1, band_prior=4.0)
    info_cfg = dataclasses.replace(band, floor_policy="uniform", info_weight=8.0, info_power=2.0, band_info_weight=0.0)
    ref25 = compress_variant("ada-c+rdr", ks, vs, qs, 0.25, config=band, page_size=16)
    at25 = compress_variant("ada-c+rdr", ks, vs, qs, 0.25, config=info_cfg, page_size=16,
                            calibration=ref25.calibration, information=info)
    assert torch.equal(at25.plan.tiers, ref25.plan.tiers)      # the band: snapkv utility, no information term
    at10 = compress_variant("ada-c+rdr", ks, vs, qs, 0.10, config=info_cfg, page_size=16,
                            calibration=ref25.calibration, information=info)
    z = information_score(info, power=2.0)
    expect = (1.0 + 1.0 + 8.0 * z) / 601                        # uniform utility 1/N, prior 1, info 8 z (× mean 1/N)
    assert torch.allclose(at10.utility, expect, rtol=1e-5)
    with pytest.raises(ValueError, match="floor_policy='nope'"):
        RetentionConfig(floor_policy="nope")


def test_information_callable_is_called_only_when_its_weight_applies():
    ks, vs, qs = _prefill(n=601)
    calls = []

    def info():
        calls.append(1)
        return torch.ones(601)

    cfg = RetentionConfig(floor=True, per_layer=False, prior=1.0, calib_tokens=128, spread=1, band_prior=4.0,
                          floor_policy="uniform", info_weight=8.0, band_info_weight=0.0)
    res = compress_variant("ada-c+rdr", ks, vs, qs, 0.25, config=cfg, page_size=16, information=info)
    assert calls == []                                          # the band: weight 0, the score is never computed
    compress_variant("ada-c+rdr", ks, vs, qs, 0.10, config=cfg, page_size=16, calibration=res.calibration,
                     information=info)
    assert calls == [1]
