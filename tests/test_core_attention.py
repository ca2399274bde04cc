# SPDX-License-Identifier: Apache-2.0
"""Logits from codes equal q·decode(codes); attention over codes equals SDPA over decoded K/V."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from sphkv import AngleKeyCodec, GroupValueQuantizer, SphKVConfig, attention_from_codes, logits_adc, logits_lut
from sphkv.codebooks import fit_codebook
from sphkv.polar import node_radii, polar_forward


@pytest.mark.parametrize("preset", ["sphkv-8", "sphkv-4", "sphkv-2"])
@pytest.mark.parametrize("n,m", [(1, 1), (17, 3), (97, 5), (130, 9)])
def test_logits_from_codes_equal_dot_with_decoded_keys(preset, n, m):
    torch.manual_seed(n * 31 + m)
    codec = AngleKeyCodec(SphKVConfig.from_name(preset, page_size=64))
    k = torch.randn(2, 3, n, 64) * 3 + torch.randn(64)
    q = torch.randn(2, 3, m, 64)
    code = codec.encode(k)
    ref = q @ codec.decode(code).transpose(-1, -2)
    tol = 1e-4 * float(ref.abs().max())
    assert float((logits_lut(q, code, codec) - ref).abs().max()) < tol
    assert float((logits_adc(q, code, codec, block=50) - ref).abs().max()) < tol


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 70), st.integers(1, 4), st.sampled_from([16, 32, 64]), st.sampled_from([8, 16, 64]),
       st.sampled_from(["none", "page"]), st.integers(0, 1000))
def test_logits_identity_property(n, m, d, page, center, seed):
    torch.manual_seed(seed)
    cfg = SphKVConfig(head_dim=d, level_bits=tuple([3] * (d.bit_length() - 1)), page_size=page, center=center,
                      value_group=d)
    codec = AngleKeyCodec(cfg)
    k, q = torch.randn(n, d) * 5, torch.randn(m, d)
    code = codec.encode(k)
    ref = q @ codec.decode(code).T
    assert torch.allclose(logits_lut(q, code, codec), ref, atol=1e-4 * (1 + float(ref.abs().max())))


def test_fitted_codebooks_beat_analytic_on_their_data():
    torch.manual_seed(0)
    cfg = SphKVConfig.from_name("sphkv-3", center="none")
    k = torch.randn(2048, 64) + 2 * torch.randn(64)            # a shared direction: angles far from isotropic
    base = AngleKeyCodec(cfg)
    y = base.rotate(k)
    _, angles = polar_forward(y)
    w = [r ** 2 for r in node_radii(y)]
    fitted = [fit_codebook(a, l + 1, b, w[l]) for l, (a, b) in enumerate(zip(angles, cfg.level_bits))]
    fit = AngleKeyCodec(cfg, codebooks=fitted)
    err = lambda c: float(((c.decode(c.encode(k)) - k).norm() / k.norm()) ** 2)  # noqa: E731
    assert err(fit) < 0.9 * err(base)


def sdpa_gqa(q, k, v, causal_tail):
    b, hq, m, d = q.shape
    g = hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    n = k.shape[2]
    mask = torch.ones(m, n, dtype=torch.bool)
    if causal_tail:
        mask = torch.arange(n)[None, :] <= (n - m + torch.arange(m))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("g", [1, 3, 4])
@pytest.mark.parametrize("n,t,m", [(17, 0, 1), (54, 5, 1), (97, 9, 4), (64, 16, 16)])
def test_attention_from_codes_matches_sdpa_on_decoded(g, n, t, m):
    torch.manual_seed(g * 100 + n)
    cfg = SphKVConfig.from_name("sphkv-4")
    kc, vq = AngleKeyCodec(cfg), GroupValueQuantizer(cfg)
    b, hkv, d = 2, 2, 64
    k, v = torch.randn(b, hkv, n, d) * 2, torch.randn(b, hkv, n, d)
    dk, dv = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    q = torch.randn(b, hkv * g, m, d)
    kcode, vcode = kc.encode(k), vq.encode(v)
    out, mass = attention_from_codes(q, kcode, vcode, kc, vq, dense_k=dk, dense_v=dv, causal=t >= m,
                                     return_key_mass=True)
    ref = sdpa_gqa(q, torch.cat([kc.decode(kcode), dk], 2), torch.cat([vq.decode(vcode), dv], 2), t >= m)
    assert out.shape == (b, hkv * g, m, d)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4)
    assert mass.shape == (b, hkv, n + t)
    assert torch.allclose(mass.sum(-1), torch.full((b, hkv), float(g * m)), atol=1e-4)


def test_attention_error_falls_with_precision():
    torch.manual_seed(1)
    k, v, q = torch.randn(1, 3, 300, 64) + 1, torch.randn(1, 3, 300, 64), torch.randn(1, 9, 1, 64) * 2
    ref = sdpa_gqa(q, k, v, False)
    errs = {}
    for preset in ("sphkv-8", "sphkv-4", "sphkv-2"):
        cfg = SphKVConfig.from_name(preset)
        kc, vq = AngleKeyCodec(cfg), GroupValueQuantizer(cfg)
        out = attention_from_codes(q, kc.encode(k), vq.encode(v), kc, vq)
        errs[preset] = float((out - ref).norm() / ref.norm())
    assert errs["sphkv-8"] < 0.02 < errs["sphkv-4"] < errs["sphkv-2"]


def test_dense_attention_matches_sdpa_causal_gqa_softcap():
    from sphkv.attention import dense_attention

    g = torch.Generator().manual_seed(3)
    n, hq, hkv, d = 13, 6, 2, 24
    q, k, v = torch.randn(n, hq, d, generator=g), torch.randn(hkv, n, d, generator=g), torch.randn(hkv, n, d, generator=g)
    vis = torch.ones(n, n, dtype=torch.bool).tril()
    o, lse = dense_attention(q, k, v, scale=0.3, visible=vis)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], is_causal=True,
                                                           scale=0.3, enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
    s = torch.einsum("nhd,hmd->hnm", q, k.repeat_interleave(3, 0)) * 0.3
    capped = (4.0 * torch.tanh(s / 4.0)).masked_fill(~vis, float("-inf"))
    o, lse = dense_attention(q, k, v, scale=0.3, visible=vis, cap=4.0)
    torch.testing.assert_close(lse, torch.logsumexp(capped, -1).T)
    torch.testing.assert_close(o, (torch.softmax(capped, -1) @ v.repeat_interleave(3, 0)).transpose(0, 1))
    with pytest.raises(ValueError, match="query heads 5 are not a multiple of kv heads 2"):
        dense_attention(q[:, :5], k, v, scale=0.3)
