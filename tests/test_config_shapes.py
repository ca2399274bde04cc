# SPDX-License-Identifier: Apache-2.0
"""Shapes: every preset and the codecs at head_dim 64, 128 and 256; GQA groups 1–16 and MQA; clear refusals."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sphkv import PRESETS, AngleKeyCodec, GroupValueQuantizer, SphKVConfig, attention_from_codes
from sphkv.codebooks import optimal_level_bits
from sphkv.config import SUPPORTED_HEAD_DIMS, num_polar_levels, pattern_level_bits
from sphkv.logits import logits_from_codes
from sphkv_hf import CodedSegment, segment_attention

DIMS = (64, 128, 256)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_at_every_head_dim(name, d):
    cfg = SphKVConfig.from_name(name, head_dim=d)
    assert cfg.num_levels == int(math.log2(d)) == num_polar_levels(d)
    assert d % cfg.value_group == 0
    spec = PRESETS[name]
    if "angle_bits_per_coord" in spec:                  # rate-distortion allocation within the preset's budget
        assert cfg.level_bits == optimal_level_bits(d, spec["angle_bits_per_coord"])
        assert cfg.angle_bits <= spec["angle_bits_per_coord"] * d
    else:
        assert cfg.level_bits == pattern_level_bits(d, spec["level_pattern"])
    codec = AngleKeyCodec(cfg)
    assert codec.code_bytes == -(-cfg.angle_bits // 8)


def test_level_bits_are_derived_never_fixed():
    assert SphKVConfig(head_dim=256).level_bits == (4,) * 8
    assert SphKVConfig(head_dim=64).level_bits == (4,) * 6
    assert SphKVConfig.from_name("sphkv-2b-lo", head_dim=64).level_bits == (2, 1, 1, 1, 1, 2)
    assert SphKVConfig.from_name("sphkv-2b-lo", head_dim=256).level_bits == (2,) + (1,) * 6 + (2,)
    assert SphKVConfig.from_name("sphkv-4", head_dim=16).value_group == 16        # capped at head_dim


@pytest.mark.parametrize("d", DIMS)
def test_codec_round_trip_and_logits_from_codes(d):
    cfg = SphKVConfig.from_name("sphkv-8", head_dim=d, page_size=16)
    kc, vq = AngleKeyCodec(cfg), GroupValueQuantizer(cfg)
    k, v = _rand(2, 40, d, seed=1) * 4 + 1.0, _rand(2, 40, d, seed=2)
    code = kc.encode(k)
    assert code.codes.shape == (2, 40, kc.code_bytes) and code.mean.shape == (2, 3, d)
    rel = float(((kc.decode(code) - k).norm() / k.norm()) ** 2)
    assert rel < 1e-3                                                     # 7 bits per coordinate
    assert float(((vq.decode(vq.encode(v)) - v).norm() / v.norm()) ** 2) < 1e-3
    q = _rand(2, 5, d, seed=3)
    got = logits_from_codes(kc.rotate(q), code, kc, rotated=True)        # [2, 5, 40]
    want = kc.rotate(q) @ kc.decode_rotated(code).transpose(-1, -2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 2), (8, 1), (16, 2), (16, 1), (32, 2)])
def test_gqa_groups_and_mqa(d, hq, hkv):
    """Groups 1, 2, 4, 8, 16 and MQA (one kv head): coded attention equals SDPA over the decoded K/V."""
    cfg = SphKVConfig.from_name("sphkv-4", head_dim=d, page_size=8)
    kc, vq = AngleKeyCodec(cfg), GroupValueQuantizer(cfg)
    k, v = _rand(1, hkv, 19, d, seed=4) * 2, _rand(1, hkv, 19, d, seed=5)
    tk, tv, q = _rand(1, hkv, 3, d, seed=6), _rand(1, hkv, 3, d, seed=7), _rand(1, hq, 2, d, seed=8)
    seg = CodedSegment.encode(k, v, kc, vq)
    got = segment_attention(q, [seg], tk, tv)
    ref = attention_from_codes(q, seg.kcode, seg.vcode, kc, vq, dense_k=tk, dense_v=tv)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    kd = torch.cat([kc.decode(seg.kcode), tk], -2)
    vd = torch.cat([vq.decode(seg.vcode), tv], -2)
    mask = torch.ones(2, 22, dtype=torch.bool)
    mask[0, -1] = False                                                    # first query is tail token 1 of 3
    sd = F.scaled_dot_product_attention(q, kd, vd, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, sd, rtol=1e-4, atol=1e-4)


def test_query_heads_must_be_a_multiple_of_kv_heads():
    tk = torch.zeros(1, 3, 2, 64)
    with pytest.raises(ValueError, match=r"query heads \(4\).*kv heads \(3\)"):
        segment_attention(torch.zeros(1, 4, 1, 64), [], tk, tk)


@pytest.mark.parametrize("kw,match", [
    (dict(head_dim=48), r"head_dim=48 is not supported; allowed: \(16, 32, 64, 128, 256\)"),
    (dict(head_dim=512), r"head_dim=512 is not supported; allowed: "),
    (dict(head_dim=128, level_bits=(4,) * 6), r"must be a tuple of 7 ints .*head_dim=128"),
    (dict(level_bits=(4, 4, 4, 4, 4, 9)), r"level_bits\[5\]=9 is out of range; allowed: 1..8"),
    (dict(value_bits=5), r"value_bits=5 is not supported; allowed: \(2, 3, 4, 8, 16\)"),
    (dict(head_dim=128, value_group=48), r"value_group=48 must divide head_dim=128; allowed: \(1, 2, 4, 8, 16, 32, "
                                         r"64, 128\)"),
    (dict(page_size=48), r"page_size=48 must be a power of two"),
    (dict(center="mean"), r"center='mean' is not supported; allowed: \('none', 'page'\)"),
])
def test_config_rejects_what_it_cannot_code(kw, match):
    with pytest.raises(ValueError, match=match):
        SphKVConfig(**kw)


def test_from_name_rejects_unknown_preset_and_head_dim():
    with pytest.raises(ValueError, match=r"unknown preset 'sphkv-9'; allowed: \["):
        SphKVConfig.from_name("sphkv-9")
    with pytest.raises(ValueError, match=rf"head_dim=80 is not supported; allowed: {re_tuple(SUPPORTED_HEAD_DIMS)}"):
        SphKVConfig.from_name("sphkv-4", head_dim=80)


def re_tuple(t) -> str:
    return str(t).replace("(", r"\(").replace(")", r"\)")


def test_cache_refuses_a_config_for_another_head_dim():
    from sphkv_hf import SphKVCache

    cache = SphKVCache(SphKVConfig.from_name("sphkv-4", head_dim=64))
    with pytest.raises(ValueError, match=r"head_dim=256 differs .*head_dim=64.*from_name\(preset, head_dim=256\)"):
        cache.update(torch.zeros(1, 1, 3, 256), torch.zeros(1, 1, 3, 256), 0)


@pytest.mark.parametrize("page_size", [0, 3, 48, 2.0])
def test_cache_policy_page_size_must_be_a_power_of_two(page_size):
    from sphkv_hf import CachePolicy

    with pytest.raises(ValueError, match=rf"page_size={page_size!r} must be a power of two >= 1 \(or None\)"):
        CachePolicy(page_size=page_size)
