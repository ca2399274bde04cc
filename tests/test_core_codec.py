# SPDX-License-Identifier: Apache-2.0
"""Key codec, value quantizer, packing and accounting."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sphkv import AngleKeyCodec, GroupValueQuantizer, NonFiniteError, SphKVConfig
from sphkv.codebooks import codebook_mse, level_codebook, optimal_level_bits
from sphkv.packing import pack_bits, packed_bytes, unpack_bits
from sphkv.polar import polar_forward, polar_inverse
from sphkv.rotation import rotation_matrix


def rel_err(a, b):
    return float(((a - b).norm() / b.norm()) ** 2)


@pytest.mark.parametrize("d", [16, 64, 128])
def test_rotation_is_orthogonal_and_seeded(d):
    r = rotation_matrix(d, 3)
    assert torch.allclose(r @ r.T, torch.eye(d), atol=1e-5)
    assert torch.equal(r, rotation_matrix(d, 3))
    assert not torch.equal(r, rotation_matrix(d, 4))


@pytest.mark.parametrize("d", [16, 64, 128])
def test_polar_round_trip_exact(d):
    x = torch.randn(7, 13, d, dtype=torch.float64)
    r, angles = polar_forward(x)
    assert [a.shape[-1] for a in angles] == [d >> l for l in range(1, int(math.log2(d)) + 1)]
    assert torch.allclose(r, x.norm(dim=-1))
    assert torch.allclose(polar_inverse(r, angles), x, atol=1e-10)
    assert all(float(a.min()) >= 0 for a in angles)
    assert float(angles[0].max()) < 2 * math.pi and all(float(a.max()) <= math.pi / 2 + 1e-12 for a in angles[1:])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 8), min_size=1, max_size=40), st.integers(1, 5), st.integers(0, 2**31))
def test_pack_unpack_round_trip(widths, rows, seed):
    w = torch.tensor(widths)
    g = torch.Generator().manual_seed(seed)
    codes = (torch.rand(rows, len(widths), generator=g) * (1 << w).to(torch.float32)).floor().to(torch.int64)
    packed = pack_bits(codes, w)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_bytes(widths))
    assert packed.shape[-1] == (sum(widths) + 7) // 8
    assert torch.equal(unpack_bits(packed, w), codes)


def test_packing_bit_layout_little_endian():
    # fields 3b=5 (101), 6b=0b110011 → bits: 101 110011 → byte0 = 0b10011_101, byte1 = 0b1
    p = pack_bits(torch.tensor([[5, 0b110011]]), torch.tensor([3, 6]))
    assert p.tolist() == [[0b10011101, 0b1]]


def test_analytic_codebooks_concentrate_and_allocation_prefers_cheap_levels():
    c2, c6 = level_codebook(2, 3), level_codebook(6, 3)
    assert (c6 - math.pi / 4).abs().max() < (c2 - math.pi / 4).abs().max()   # higher levels concentrate at π/4
    assert codebook_mse(6, 3) < codebook_mse(2, 3) < codebook_mse(1, 3)
    bits = optimal_level_bits(64, 3.5)
    assert sum((64 >> (l + 1)) * b for l, b in enumerate(bits)) <= 3.5 * 64
    assert bits[-1] >= bits[0]         # one angle at the top costs 1/32 of a level-1 bit


@pytest.mark.parametrize("preset,bound", [("sphkv-8", 2e-4), ("sphkv-4", 0.03), ("sphkv-3", 0.08), ("sphkv-2", 0.2)])
@pytest.mark.parametrize("d", [64, 128])
def test_key_round_trip_error_bound(preset, bound, d):
    torch.manual_seed(0)
    codec = AngleKeyCodec(SphKVConfig.from_name(preset, head_dim=d))
    k = torch.randn(3, 97, d) * 2 + torch.randn(d)        # a shared mean direction, like real keys
    code = codec.encode(k)
    assert code.codes.shape == (3, 97, codec.code_bytes) and code.radius.dtype == torch.float16
    assert code.mean.shape == (3, 2, d) and code.mean.dtype == torch.bfloat16
    assert rel_err(codec.decode(code), k) < bound


def test_centering_helps_keys_with_a_shared_direction():
    k = torch.randn(4, 128, 64) + 4 * torch.randn(64)
    cfg = SphKVConfig.from_name("sphkv-3")
    e_page = rel_err(AngleKeyCodec(cfg).decode(AngleKeyCodec(cfg).encode(k)), k)
    e_none = rel_err(AngleKeyCodec(cfg.replace(center="none")).decode(AngleKeyCodec(cfg.replace(center="none")).encode(k)), k)
    assert e_page < 0.5 * e_none


def test_bytes_accounting_exact():
    cfg = SphKVConfig.from_name("sphkv-4", head_dim=64)          # level bits (4,3,3,3,4,4): 224 bits = 28 B
    kc, vq = AngleKeyCodec(cfg), GroupValueQuantizer(cfg)
    assert kc.code_bytes == 28
    assert kc.stored_bytes(100) == 100 * (28 + 2) + 2 * 64 * 2     # codes + fp16 radius + 2 bf16 page means
    assert vq.stored_bytes(100) == 100 * (32 + 1 * 4)              # int4 × 64 + fp16 scale & zero (1 group)
    code = kc.encode(torch.randn(100, 64))
    real = sum(t.numel() * t.element_size() for t in (code.codes, code.radius, code.mean))
    assert real == kc.stored_bytes(100)
    vcode = vq.encode(torch.randn(100, 64))
    assert sum(t.numel() * t.element_size() for t in (vcode.codes, vcode.scale, vcode.zero)) == vq.stored_bytes(100)


@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.2), (3, 0.45), (2, 1.0)])
@pytest.mark.parametrize("rotate", [True, False])
def test_value_quantizer_error_bound(bits, bound, rotate):
    vq = GroupValueQuantizer(SphKVConfig(value_bits=bits, value_group=32, value_rotate=rotate))
    v = torch.randn(5, 33, 64)
    out = vq.decode(vq.encode(v))
    # asymmetric rounding: |err| ≤ scale/2 per element (plus fp16 rounding of scale/zero)
    assert float((out - v).abs().max()) < bound * (v.abs().max() if not rotate else 2 * v.abs().max())
    assert rel_err(out, v) < {8: 1e-4, 4: 0.02, 3: 0.08, 2: 0.35}[bits]


def test_value_bits16_is_bf16_exact():
    vq = GroupValueQuantizer(SphKVConfig(value_bits=16, value_rotate=False))
    v = torch.randn(4, 64)
    assert torch.equal(vq.decode(vq.encode(v)), v.to(torch.bfloat16).to(torch.float32))


def test_zero_norm_key_decodes_to_zero():
    codec = AngleKeyCodec(SphKVConfig.from_name("sphkv-4", center="none"))
    k = torch.randn(5, 64)
    k[2] = 0
    out = codec.decode(codec.encode(k))
    assert float(out[2].abs().max()) == 0.0 and torch.isfinite(out).all()


def test_nonfinite_raise_names_tensor_and_row():
    codec = AngleKeyCodec(SphKVConfig.from_name("sphkv-4"))
    k = torch.randn(2, 10, 64)
    k[1, 7, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"keys contains NaN/Inf in 1 token row\(s\); first at index \(1, 7\)"):
        codec.encode(k)
    vq = GroupValueQuantizer(SphKVConfig())
    with pytest.raises(NonFiniteError, match="values"):
        vq.encode(torch.full((3, 64), float("inf")))


def test_nonfinite_zero_policy_isolates_bad_tokens():
    cfg = SphKVConfig.from_name("sphkv-4", nonfinite="zero", center="none")
    codec = AngleKeyCodec(cfg)
    k = torch.randn(10, 64)
    clean = codec.decode(codec.encode(k))
    k[4] = float("inf")
    out = codec.decode(codec.encode(k))
    assert torch.isfinite(out).all() and float(out[4].abs().max()) == 0
    keep = torch.arange(10) != 4
    assert torch.equal(out[keep], clean[keep])           # other tokens are untouched


@pytest.mark.parametrize("field,value,match", [
    ("head_dim", 48, "head_dim=48"),
    ("level_bits", (4, 4), "level_bits=\\(4, 4\\)"),
    ("level_bits", (9, 4, 4, 4, 4, 4), r"level_bits\[0\]=9"),
    ("value_bits", 5, "value_bits=5"),
    ("value_group", 48, "value_group=48"),
    ("page_size", 48, "page_size=48"),
    ("center", "head", "center='head'"),
    ("codebook", "fitted", "codebook='fitted'"),
    ("nonfinite", "ignore", "nonfinite='ignore'"),
])
def test_bad_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        SphKVConfig(**{field: value})


def test_unknown_preset_lists_allowed():
    with pytest.raises(ValueError, match="unknown preset 'sphkv-5'.*sphkv-4"):
        SphKVConfig.from_name("sphkv-5")


def test_encode_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"keys must be \[..., N>=1, 64\]"):
        AngleKeyCodec(SphKVConfig()).encode(torch.randn(3, 32))
