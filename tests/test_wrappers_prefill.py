# SPDX-License-Identifier: Apache-2.0
"""The CPU kernels (:mod:`sphkv_kernels.cpu_decode`) and the prefill wrapper against a float64 dense oracle.

Decode through :class:`BatchDecodeWithSphKVPagedKVCacheWrapper` with ``backend="cpu"``; many query
tokens per request through :class:`BatchPrefillWithSphKVPagedKVCacheWrapper` (``cpu`` and ``reference``),
with and without logit soft-capping; odd sequence lengths, partial pages, mixed tiers.
"""
from __future__ import annotations

import pytest
import torch

from flashinfer_ext import BatchDecodeWithSphKVPagedKVCacheWrapper, BatchPrefillWithSphKVPagedKVCacheWrapper
from flashinfer_ext.prefill import merge_state
from sphkv import SphKVConfig
from sphkv.tiers import Tier, TierSet
from sphkv_kernels import cpu_decode
from sphkv_kernels.testing import _row_kv, dense_oracle, poison, random_paged_cache

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="no C++ compiler for the CPU kernels")


def _tiers(page_size, names=("sphkv-4", "sphkv-2")):
    mk = lambda n: Tier(n, SphKVConfig.from_name(n, head_dim=64, page_size=page_size))  # noqa: E731
    return TierSet((Tier("dense"), *(mk(n) for n in names)), head_dim=64, page_size=page_size)


def _oracle_tokens(q, cache, qo, sm_scale, cap=0.0):
    """Float64: every query token of request b attends to all of b's pages (soft cap optional)."""
    n, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    out = torch.zeros(n, hq, d, dtype=torch.float64)
    lse = torch.full((n, hq), float("-inf"), dtype=torch.float64)
    for b in range(len(qo) - 1):
        for h in range(hkv):
            k, v, _ = _row_kv(cache, b * hkv + h)
            qq = q[qo[b]:qo[b + 1], h * g:(h + 1) * g].double()                    # [m, G, d]
            s = qq @ k.T * sm_scale
            if cap > 0:
                s = cap * torch.tanh(s / cap)
            lse[qo[b]:qo[b + 1], h * g:(h + 1) * g] = torch.logsumexp(s, -1)
            out[qo[b]:qo[b + 1], h * g:(h + 1) * g] = torch.softmax(s, -1) @ v
    return out, lse


@pytest.mark.parametrize("seq_lens,page_size,group,names", [
    ([17, 54, 97], 16, 1, ("sphkv-4", "sphkv-2")),
    ([97, 5, 33], 16, 3, ("sphkv-3", "sphkv-8")),
    ([130, 64], 64, 4, ("sphkv-4b", "sphkv-2")),
])
def test_decode_wrapper_cpu_backend_matches_oracle(seq_lens, page_size, group, names):
    ts = _tiers(page_size, names)
    hkv = 2
    cache = random_paged_cache(ts.tiers, seq_lens=seq_lens, num_kv_heads=hkv, head_dim=64, page_size=page_size,
                               seed=sum(seq_lens) + group)
    w = BatchDecodeWithSphKVPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8), tiers=ts, backend="cpu")
    w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, hkv * group, hkv, 64, page_size,
           page_lens=cache.page_lens, key_mass=True)
    q = torch.randn(len(seq_lens), hkv * group, 64)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:2])
    mass = torch.empty(cache.indices.numel(), page_size)
    poison(out, lse, mass)
    w.run(q, cache.pools, out=out, lse=lse, key_mass_out=mass)
    ref_out, ref_lse, ref_mass = dense_oracle(q, cache, sm_scale=64 ** -0.5, key_mass=True)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mass.double(), ref_mass, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "cpu-flash-f32", "cpu-flash-bf16", "reference"])
@pytest.mark.parametrize("seq_lens,q_lens,page_size,group,cap", [
    ([17, 54, 97], [1, 7, 23], 16, 3, 0.0),       # 23 new tokens x 3 heads: the ATen tile-product / flash path
    ([33, 80], [5, 1], 16, 1, 0.0),
    ([70, 9], [3, 4], 16, 2, 2.5),                # logit soft-capping
    ([200, 61, 0, 129], [37, 16, 20, 15], 16, 4, 0.0),   # flash route: > 8 pages (two tiles), a request without pages
])
def test_prefill_wrapper_matches_oracle(backend, seq_lens, q_lens, page_size, group, cap):
    """``cpu``: the per-page route (``flash="off"``); ``cpu-flash-*``: items of >= FLASH_MIN_TOKENS new tokens through
    page tiles and ATen's flash kernel (float32: the per-page route's tolerance; bfloat16: its inputs rounded to bf16)."""
    if backend == "reference" and cap > 0:
        pytest.skip("soft-capping is a CPU-kernel feature (the decode kernels have none)")
    flash = {"cpu": "off", "cpu-flash-f32": "float32", "cpu-flash-bf16": "bfloat16"}.get(backend)
    backend = "reference" if backend == "reference" else "cpu"
    ts = _tiers(page_size)
    hkv = 2
    cache = random_paged_cache(ts.tiers, seq_lens=seq_lens, num_kv_heads=hkv, head_dim=64, page_size=page_size,
                               seed=7 * sum(seq_lens) + group)
    qo = [0]
    for m in q_lens:
        qo.append(qo[-1] + m)
    w = BatchPrefillWithSphKVPagedKVCacheWrapper(tiers=ts, backend=backend)
    w.plan(torch.tensor(qo), cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, hkv * group, hkv,
           64, page_size, page_lens=cache.page_lens, kernel_options={"flash": flash} if flash else None)
    q = torch.randn(qo[-1], hkv * group, 64)
    out, lse = w.run(q, cache.pools, sm_scale=0.11, logits_soft_cap=cap, return_lse=True)
    ref_out, ref_lse = _oracle_tokens(q, cache, qo, 0.11, cap)
    if flash == "bfloat16":     # q, keys, values rounded to bf16 (relative 2**-9): logits move by ~|s| * 3e-3
        torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=2e-2)
        has = torch.isfinite(ref_lse)
        assert float((out.double() - ref_out)[has].abs().mean()) < 2e-3
        return
    torch.testing.assert_close(out.double(), ref_out, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-4, rtol=2e-4)


def test_merge_state_equals_attention_over_the_union():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(4, 2, 8, generator=g), torch.randn(2, 11, 8, generator=g), torch.randn(2, 11, 8, generator=g)

    def attend(ks, vs):
        s = torch.einsum("nhd,hkd->nhk", q, ks)
        return torch.einsum("nhk,hkd->nhd", torch.softmax(s, -1), vs), torch.logsumexp(s, -1)

    o_all, l_all = attend(k, v)
    o, lse = merge_state(*attend(k[:, :4], v[:, :4]), *attend(k[:, 4:], v[:, 4:]))
    torch.testing.assert_close(o, o_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, l_all, atol=1e-5, rtol=1e-5)
    empty = torch.full_like(l_all, float("-inf"))
    o2, l2 = merge_state(o_all, l_all, torch.zeros_like(o_all), empty)
    torch.testing.assert_close(o2, o_all)
    torch.testing.assert_close(l2, l_all)


def _share_leading_pages(cache, members, k):
    """A copy of ``cache`` where every request in ``members[1:]`` starts with request ``members[0]``'s first ``k``
    entries (every kv head), followed by its own entries past its first ``k`` — a radix-shared prefix."""
    import dataclasses

    hkv = cache.num_kv_heads
    ip = cache.indptr.tolist()
    ind, tie, ln, new_ip = [], [], [], [0]
    for r in range(len(ip) - 1):
        b, h = divmod(r, hkv)
        lo, hi = ip[r], ip[r + 1]
        if b in members[1:]:
            src = ip[members[0] * hkv + h]
            ent = list(range(src, src + k)) + list(range(lo + k, hi))
        else:
            ent = list(range(lo, hi))
        ind += [int(cache.indices[e]) for e in ent]
        tie += [int(cache.page_tiers[e]) for e in ent]
        ln += [int(cache.page_lens[e]) for e in ent]
        new_ip.append(new_ip[-1] + len(ent))
    t32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    last = [ln[new_ip[r + 1] - 1] for r in range(len(new_ip) - 1)]
    return dataclasses.replace(cache, indptr=t32(new_ip), indices=t32(ind), page_tiers=t32(tie), page_lens=t32(ln),
                               last_page_len=t32(last))


@pytest.mark.parametrize("q_lens,flash", [([1, 1, 1, 1, 1], "off"),          # decode: 3 sharers x GQA rows
                                          ([2, 17, 20, 1, 18], "float32"),   # extend: the group item takes flash
                                          ([3, 5, 0, 4, 2], "off")])         # a request without queries
def test_cascade_reads_shared_pages_once_and_matches_oracle(q_lens, flash):
    """Requests 1..3 share request 1's first 3 pages (mixed tiers) on every kv head: the CPU plan makes one group
    item over them (rows of all sharers) plus each member's own pages; the result equals the float64 oracle and the
    plan without cascade."""
    from sphkv_kernels.cpu_cascade import cpu_items, shared_groups

    ts = _tiers(16)
    hkv, group = 2, 3
    base = random_paged_cache(ts.tiers, seq_lens=[40, 90, 75, 83, 20], num_kv_heads=hkv, head_dim=64, page_size=16,
                              seed=5)
    cache = _share_leading_pages(base, [1, 2, 3], 3)
    qo = [0]
    for m in q_lens:
        qo.append(qo[-1] + m)
    qo_t = torch.tensor(qo)
    groups = shared_groups(qo_t, cache.indptr.long(), cache.indices, cache.page_tiers, cache.page_lens, hkv)
    expect = [(1, 3, 3)] if q_lens[2] else []
    assert groups == expect, groups
    if q_lens[2] == 0:                                # the empty request breaks the run: 1 and 3 are not adjacent
        assert all(len(p) <= 1 for p in cpu_items(qo_t, cache.indptr, cache.indices, cache.page_tiers,
                                                  cache.page_lens, num_kv_heads=hkv, num_tiers=3))
    q = torch.randn(qo[-1], hkv * group, 64)
    outs = []
    for cascade in (True, False):
        w = BatchPrefillWithSphKVPagedKVCacheWrapper(tiers=ts, backend="cpu")
        w.plan(qo_t, cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, hkv * group, hkv, 64, 16,
               page_lens=cache.page_lens, kernel_options={"flash": flash, "cascade": cascade})
        outs.append(w.run(q, cache.pools, sm_scale=0.11, return_lse=True))
    ref_out, ref_lse = _oracle_tokens(q, cache, qo, 0.11)
    for out, lse in outs:
        torch.testing.assert_close(out.double(), ref_out, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-4, rtol=2e-4)


def test_coded_expand_cpu_equals_the_codec_decode():
    """The C++ page expansion used for copy-on-write / demotion reads equals the codec's decode (original domain),
    partial pages included (zeros past a page's length)."""
    from sphkv.pages.arenas import TIER_KINDS
    from sphkv_kernels.layout import CodedLayout

    ts = _tiers(16, ("sphkv-3", "sphkv-2"))
    cache = random_paged_cache(ts.tiers, seq_lens=[61, 37], num_kv_heads=2, head_dim=64, page_size=16, seed=3)
    for t in (1, 2):
        pool = cache.pools[t]
        ids = torch.arange(min(pool.num_pages, 5), dtype=torch.int32)
        lens = torch.tensor([16, 9, 1, 16, 4][:ids.numel()], dtype=torch.int32)
        k, v = cpu_decode.coded_expand_cpu(pool, ids, lens, layout=CodedLayout.from_config(ts.tiers[t].config))
        rk, rv = TIER_KINDS["ada"].decode(pool, ids.long(), lens.long())
        valid = torch.arange(16)[None, :] < lens[:, None]
        torch.testing.assert_close(k[valid], rk, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v[valid], rv, atol=1e-4, rtol=1e-4)
        assert bool((k[~valid] == 0).all()) and bool((v[~valid] == 0).all())
