# SPDX-License-Identifier: Apache-2.0
"""Extend's prefix part on the tiles route (:mod:`sphkv_kernels.extend_tiles`: each key tile decoded once per block
of new tokens) against :func:`sphkv_kernels.extend.extend_attention_reference`.

Without CUDA the Triton kernels run under the CPU interpreter (float32 dots: tight tolerances). The prefix part
comes from :class:`BatchPrefillWithSphKVPagedKVCacheWrapper` (``kernel_options={"extend": "tiles"}``), the new
tokens' causal part from a torch softmax, merged by ``merge_state`` as an engine does; float16 queries.
"""
from __future__ import annotations

import logging

import pytest
import torch

from flashinfer_ext import BatchPrefillWithSphKVPagedKVCacheWrapper
from flashinfer_ext.prefill import merge_state
from sphkv import SphKVConfig
from sphkv.tiers import Tier
from sphkv_kernels import decode as kd
from sphkv_kernels.extend import extend_attention_reference
from sphkv_kernels.testing import random_paged_cache, use_interpreter_if_no_cuda


@pytest.fixture(scope="module")
def device():
    with use_interpreter_if_no_cuda() as dev:
        yield dev


def _tier(name, head_dim, page_size):
    return Tier("dense") if name == "dense" else Tier(name, SphKVConfig.from_name(name, head_dim=head_dim,
                                                                                   page_size=page_size))


def _causal_new(q, k, v, qo, hkv, scale):
    """The new tokens among themselves (causal), float32: ``out [n, Hq, d]``, natural-log ``lse [n, Hq]``."""
    n, hq, d = q.shape
    g = hq // hkv
    out = torch.zeros(n, hq, d)
    lse = torch.full((n, hq), float("-inf"))
    for b in range(len(qo) - 1):
        lo, hi = qo[b], qo[b + 1]
        if hi == lo:
            continue
        kk = k[lo:hi].float().repeat_interleave(g, 1).transpose(0, 1)             # [Hq, m, d]
        vv = v[lo:hi].float().repeat_interleave(g, 1).transpose(0, 1)
        s = q[lo:hi].float().transpose(0, 1) @ kk.transpose(1, 2) * scale         # [Hq, m, m]
        s = s.masked_fill(torch.ones(hi - lo, hi - lo, dtype=torch.bool).triu(1), float("-inf"))
        lse[lo:hi] = torch.logsumexp(s, -1).T
        out[lo:hi] = (torch.softmax(s, -1) @ vv).transpose(0, 1)
    return out, lse


# seq_lens, q_lens, num_kv_heads, group, head_dim, tiers, kernel_options
CASES = [
    # mixed dense/coded prefix, partial pages, 9 new tokens in blocks of 4 (block_m 16 / group 4), split-K, one
    # request without new tokens
    ([37, 54, 19], [5, 9, 0], 2, 4, 64, ("dense", "sphkv-4"), dict(block_m=16, pages_per_split=2)),
    # GQA 1, head_dim 128, coded prefix only (tier 0 coded), default block (64 tokens per program)
    ([45], [7], 2, 1, 128, ("sphkv-4",), {}),
    # sphkv-2 at head_dim 64 has 14-byte key codes: not the tensor-core kernel's; per-token decode items (logged)
    ([83, 61], [3, 6], 1, 4, 64, ("dense", "sphkv-2", "sphkv-8"), dict(block_m=32)),
]


@pytest.mark.parametrize("seq_lens,q_lens,hkv,group,head_dim,names,kopt", CASES)
def test_tiles_route_matches_extend_reference(device, monkeypatch, caplog, seq_lens, q_lens, hkv, group, head_dim,
                                              names, kopt):
    monkeypatch.setattr(kd, "_WARNED", set())
    page_size = 16
    tiers = [_tier(n, head_dim, page_size) for n in names]
    cache = random_paged_cache(tiers, seq_lens=seq_lens, num_kv_heads=hkv, head_dim=head_dim, page_size=page_size,
                               seed=sum(seq_lens) + group, device=device)
    assert set(cache.page_tiers.tolist()) == set(range(len(tiers))), "every tier must hold prefix pages"
    qo = [0]
    for m in q_lens:
        qo.append(qo[-1] + m)
    hq, n = hkv * group, qo[-1]
    g = torch.Generator().manual_seed(len(seq_lens) + head_dim)
    q = torch.randn(n, hq, head_dim, generator=g).to(torch.float16)
    k_new = torch.randn(n, hkv, head_dim, generator=g).to(torch.float16)
    v_new = torch.randn(n, hkv, head_dim, generator=g).to(torch.float16)
    scale = head_dim ** -0.5
    w = BatchPrefillWithSphKVPagedKVCacheWrapper(tiers=tiers, backend="triton")
    with caplog.at_level(logging.WARNING, logger="sphkv_kernels"):
        w.plan(torch.tensor(qo), cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, hq, hkv,
               head_dim, page_size, page_lens=cache.page_lens, kernel_options=dict(kopt, extend="tiles"))
    lay = [None if t.dense else w._layouts[i] for i, t in enumerate(tiers)]
    uncovered = [t.name for t, la in zip(tiers, lay) if la is not None and not kd.tc_supported(la, group)]
    for name in uncovered:             # the slower per-token route is logged, never silent
        assert any(name in r.getMessage() and "per-token" in r.getMessage() for r in caplog.records), caplog.text
    o_p, l_p = w.run(q.to(device), cache.pools, sm_scale=scale, return_lse=True)
    assert o_p.shape == (n, hq, head_dim) and l_p.shape == (n, hq)
    o_n, l_n = _causal_new(q, k_new, v_new, qo, hkv, scale)
    out, _ = merge_state(o_p.cpu(), l_p.cpu(), o_n, l_n)
    ref = extend_attention_reference(q, k_new, v_new, torch.tensor(qo), cache.pools, cache.indptr, cache.indices,
                                     cache.page_tiers, cache.page_lens, num_kv_heads=hkv, sm_scale=scale)
    tol = 2e-4 if device == "cpu" else 2e-2       # interpreter: float32 dots; GPU: float16/bf16 operands
    torch.testing.assert_close(out, ref.cpu(), atol=tol, rtol=tol)
    # the same plan through the reference launchers gives the same prefix state
    wr = BatchPrefillWithSphKVPagedKVCacheWrapper(tiers=tiers, backend="reference")
    wr.plan(torch.tensor(qo), cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, hq, hkv,
            head_dim, page_size, page_lens=cache.page_lens, kernel_options=dict(kopt, extend="tiles"))
    o_r, l_r = wr.run(q.to(device), cache.pools, sm_scale=scale, return_lse=True)
    torch.testing.assert_close(l_p, l_r, atol=tol, rtol=tol)
    torch.testing.assert_close(o_p, o_r, atol=tol, rtol=tol)


def test_tiles_route_rejects_bad_options(device):
    tiers = [Tier("dense"), _tier("sphkv-4", 64, 16)]
    cache = random_paged_cache(tiers, seq_lens=[20], num_kv_heads=1, head_dim=64, page_size=16, device=device)
    w = BatchPrefillWithSphKVPagedKVCacheWrapper(tiers=tiers, backend="triton")
    args = (torch.tensor([0, 3]), cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, 2, 1, 64, 16)
    for kopt, match in ((dict(extend="tiles", block_m=24), r"block_m'\]=24"), (dict(extend="fast"), "'fast'"),
                        (dict(extend="tiles", warps=4), "unknown")):
        with pytest.raises(ValueError, match=match):
            w.plan(*args, page_lens=cache.page_lens, kernel_options=kopt)
