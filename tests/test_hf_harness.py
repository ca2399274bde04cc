# SPDX-License-Identifier: Apache-2.0
"""Quality harness: method interface and exact bits on synthetic prefixes; a smoke run on the real model."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.quality.eviction import Eviction, pyramid_budgets, window_attention
from benchmarks.quality.methods import PrefillContext, get_method, max_tokens_for_bytes
from benchmarks.quality.run import load_methods, main
from sphkv_hf import SphKVCache

L, HKV, HQ, N, D, W = 3, 2, 4, 256, 64, 16


@pytest.fixture(scope="module")
def ctx() -> PrefillContext:
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(1, HKV, N, D, generator=g).to(torch.bfloat16) for _ in range(L)]
    values = [torch.randn(1, HKV, N, D, generator=g).to(torch.bfloat16) for _ in range(L)]
    queries = [torch.randn(1, HQ, W, D, generator=g) for _ in range(L)]
    return PrefillContext(keys, values, queries, model_config=None)


def test_registry_has_required_methods():
    reg = load_methods()
    quick = ["full", "sphkv-4b+sink", "ada+rdr@0.25", "ada+rdr@0.10", "snapkv@0.10", "streamingllm@0.10",
             "pyramidkv@0.10", "h2o@0.10"]                  # what issues 12 and 13 check, on every model x corpus
    assert sorted(n for n, e in reg.items() if e.quick) == sorted(quick)
    assert all(n in reg for n in ["kivi-4", "kivi-2", "turbo-4", "polarquant-4", "sphkv-4", "sphkv-2b+sink"])
    assert all(n in reg for n in ["sphkv-3", "sphkv-2", "sphkv-8", "turbo-3", "kivi-3", "polarquant-2"])
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")


@pytest.mark.parametrize("name,bits", [
    ("full", 16.0),
    ("turbo-4", 4 + 16 / 64),                         # 4-bit codes + fp16 norm per token, K and V alike
    ("kivi-2", None), ("polarquant-4", None), ("sphkv-4", None)])
def test_bits_per_element_exact(ctx, name, bits):
    load_methods()
    prefix = get_method(name).build(ctx)
    elements = N * L * HKV * D * 2
    assert prefix.bits_per_element == prefix.nbytes * 8 / elements
    if name == "kivi-2":                             # 224 tokens quantized (group 64) + 32 residual dense
        per_head = (2 * 192 * D * 2) // 8 + 3 * D * 4 + 192 * 1 * 4 + 64 * D * 4
        bits = per_head * L * HKV * 8 / elements
    if name == "polarquant-4":                       # 2 token groups of 128: fp16 min+step for r and φ per pair
        per_head = N * D * 4 // 8 + 2 * 32 * 2 * 4 + N * D * 4 // 8 + N * 1 * 4
        bits = per_head * L * HKV * 8 / elements
    if name == "sphkv-4":
        from sphkv import AngleKeyCodec, GroupValueQuantizer, SphKVConfig
        cfg = SphKVConfig.from_name("sphkv-4")
        per_head = AngleKeyCodec(cfg).stored_bytes(N) + GroupValueQuantizer(cfg).stored_bytes(N) + 4 * 8
        bits = per_head * L * HKV * 8 / elements
    assert prefix.bits_per_element == pytest.approx(bits, rel=1e-12)


def test_eviction_budget_and_kept_tokens(ctx):
    load_methods()
    k = max_tokens_for_bytes(0.10 * N * D * 4, D * 4, page_size=64, page_meta=8, num_tokens=N)
    assert k == 25                                  # 25·256 + 8 ≤ 6553.6 < 26·256 + 8
    for policy in ("streamingllm", "snapkv", "h2o", "pyramidkv"):
        prefix = Eviction(policy, 0.10).build(ctx)
        assert prefix.bits_per_element <= 0.10 * 16 + 1e-9 or policy == "pyramidkv"
        seg = prefix.segments[0][0]
        pos = seg.positions[0, 0]
        if policy == "streamingllm":
            assert pos[:4].tolist() == [0, 1, 2, 3] and pos[-1] == N - 1 and pos.numel() == k
        if policy == "snapkv":                      # the observation window is always kept
            assert set(range(N - W, N)) <= set(pos.tolist())
    b = pyramid_budgets(100, 10, 16, 1000)
    assert b == sorted(b, reverse=True) and abs(sum(b) / 10 - 100) < 1


def test_window_attention_sums_to_queries(ctx):
    m = window_attention(ctx.queries[0], ctx.keys[0])
    assert m.shape == (1, HKV, N) and float(m.sum()) == pytest.approx(HQ * W, rel=1e-5)
    assert float(m[..., -1].min()) > 0               # the last key is seen by the last query only


def test_compressed_prefix_runs_in_cache(ctx):
    load_methods()
    prefix = get_method("sphkv-3").build(ctx)
    cache = SphKVCache.from_prefix(prefix.segments, prefix.num_positions)
    k, _ = cache.update(torch.randn(1, HKV, 3, D), torch.randn(1, HKV, 3, D), 0)
    out = k.sphkv_layer.attend(torch.randn(1, HQ, 3, D), None)
    assert out.shape == (1, HQ, 3, D) and torch.isfinite(out).all() and cache.get_seq_length() == N + 3


@pytest.mark.slow
def test_smoke_run_writes_rows(tmp_path):
    out = tmp_path / "smoke.json"
    main(["--smoke", "--no-progress", "--threads", "1", "--out", str(out)])
    rows = json.loads(out.read_text())
    keys = {"method", "bits_per_element", "context", "nll", "nll_delta_pct", "needle_hit_rate", "answer_nll",
            "logit_rel_err", "kl", "budget_fraction", "layer_attn_rel_err"}
    assert [r["method"] for r in rows] == ["full", "sphkv-4", "kivi-4", "snapkv@0.10"]
    for r in rows:
        assert keys <= set(r) and r["context"] == 1024 and len(r["layer_attn_rel_err"]) == 30
        assert r["model"] == "smollm2" and r["corpus"] == "essays" and r["retrieval_cases"] == 24
    full, ada = rows[0], rows[1]
    assert full["bits_per_element"] == 16.0 and full["nll_delta_pct"] == 0.0 and full["budget_fraction"] is None
    assert ada["bits_per_element"] < 4.5 and abs(ada["nll_delta_pct"]) < 5.0
    assert rows[3]["budget_fraction"] == 0.10 and rows[3]["bits_per_element"] < 1.7
    assert out.with_suffix(".md").read_text().startswith("| model | corpus | method")


def test_ada_reuses_shared_pages_bit_identically(ctx):
    """A needle-like context sharing its first 150 tokens with ``ctx``: reusing the base's pages gives
    the same codes, means, values and bytes as encoding from scratch."""
    from benchmarks.quality.ada import Ada

    g = torch.Generator().manual_seed(1)

    def swap(t):
        return torch.cat([t[..., :150, :], torch.randn(t[..., 150:, :].shape, generator=g).to(t.dtype)], -2)

    needle = PrefillContext([swap(k) for k in ctx.keys], [swap(v) for v in ctx.values], ctx.queries, None,
                            base=ctx, shared=150)
    shared = Ada("sphkv-4b", sink=4)
    shared.build(ctx)
    got = shared.build(needle)
    want = Ada("sphkv-4b", sink=4).build(PrefillContext(needle.keys, needle.values, ctx.queries, None))
    assert got.nbytes == want.nbytes
    for a, b in zip(got.segments, want.segments):
        ca, cb = a[1], b[1]
        assert torch.equal(ca.kcode.codes, cb.kcode.codes) and torch.equal(ca.kcode.radius, cb.kcode.radius)
        assert torch.equal(ca.kcode.mean, cb.kcode.mean) and torch.equal(ca.vcode.codes, cb.vcode.codes)
        assert torch.equal(ca.vcode.scale, cb.vcode.scale)


def test_fast_logits_equal_the_adc_gemm():
    from benchmarks.quality.tasks import fast_logits_from_codes
    from sphkv import AngleKeyCodec, SphKVConfig
    from sphkv.logits import logits_adc

    g = torch.Generator().manual_seed(0)
    for preset in ("sphkv-4b", "sphkv-2b", "sphkv-8"):
        codec = AngleKeyCodec(SphKVConfig.from_name(preset))
        code = codec.encode(torch.randn(1, 3, 192, 64, generator=g) * 4)
        q = torch.randn(1, 3, 40, 64, generator=g)
        ref = logits_adc(q, code, codec)
        got = fast_logits_from_codes(q, code, codec)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
