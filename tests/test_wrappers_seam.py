# SPDX-License-Identifier: Apache-2.0
"""The served path at its seam, without SGLang: the sphkv store built the way ``SphKVPool`` builds it,
the batch plan (:meth:`SphKVStore.plan_pages`) and the ``flashinfer_ext`` wrapper, exactly as
``sphkv_sglang.backend`` drives them, against a float64 oracle decoded page by page through the codecs.

Random batches with a shared prefix (two requests read the same coded pages), partial pages, pages in
staging, coded pages in both tiers (one demoted), an extend over a cached prefix and decode steps.
The CPU variants run here; the CUDA variant runs the same code on a GPU (the Triton decode kernels
behind the wrapper) and is skipped on machines without one.
"""
from __future__ import annotations

import pytest
import torch

from flashinfer_ext import BatchPrefillWithSphKVPagedKVCacheWrapper
from sphkv.pool import TierPool
from sphkv_kernels import cpu_decode
from sphkv_sglang.config import SphKVServeConfig
from sphkv_sglang.store import SphKVStore

P, H, G, D, L = 16, 2, 3, 64, 2


def _oracle_kv(store: SphKVStore, layer: int, slots: torch.Tensor, h: int):
    """Keys/values ``[n, d]`` float64 of the first ``len(slots)`` tokens, page by page from the table."""
    ks, vs = [], []
    n = slots.numel()
    for i in range(0, n, P):
        page, cnt = int(slots[i]) // P, min(P, n - i)
        st = int(store.table.stage_of[page])
        if st >= 0:
            ks.append(store.k_stage[layer, st, h, :cnt].double().cpu())
            vs.append(store.v_stage[layer, st, h, :cnt].double().cpu())
            continue
        t, phys = int(store.table.tier_of[page]), int(store.table.phys_of[page])
        assert t >= 0, f"page {page} neither staged nor coded"
        arena: TierPool = store.arenas[t][layer]
        kc, vc, mean = arena.read(torch.tensor([phys * H + h]), torch.tensor([cnt]))
        k_rot = arena.kcodec.decode_rotated(kc).double() + mean.double()
        ks.append((k_rot @ arena.kcodec.rotation.to(k_rot.device).double()).cpu())
        vs.append(arena.vquant.decode(vc).double().cpu())
    return torch.cat(ks), torch.cat(vs)


def _oracle(store, layer, q, rows, lens, qo, scale, extra_kv=None):
    """Every query of request b attends to its first lens[b] tokens (+ optional extra causal keys)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(len(lens)):
        for h in range(H):
            k, v = _oracle_kv(store, layer, rows[b, :lens[b]], h)
            qq = q[qo[b]:qo[b + 1], h * G:(h + 1) * G].double().cpu()
            s = qq @ k.T * scale
            out[qo[b]:qo[b + 1], h * G:(h + 1) * G] = torch.softmax(s, -1) @ v
    return out


def _tol(device):
    # CPU: float32 throughout; CUDA: the decode kernels' float16 (cos, sin) tables and fp16/bf16 dots (H200 run of
    # 2026-12-02: 1 of 1152 outputs off the float64 oracle by 2.8e-3, the rest within 2e-3)
    return dict(atol=2e-3, rtol=2e-3) if str(device) == "cpu" else dict(atol=1e-2, rtol=1e-2)


def _store(device, preset="sphkv-4"):
    cfg = SphKVServeConfig(preset=preset, page_size=P, max_running_requests=4, staging_pages=8)
    return SphKVStore(cfg, num_pages=24, num_layers=L, num_kv_heads=H, head_dim=D, dtype=torch.bfloat16,
                      device=device)


def _kv(n, g):
    mean = torch.randn(H, D, generator=g) * 2
    k = (mean + torch.randn(n, H, D, generator=g) * (1 + torch.rand(D, generator=g))).to(torch.bfloat16)
    return k, torch.randn(n, H, D, generator=g).to(torch.bfloat16)


def _run_seam(device, backend):
    g = torch.Generator().manual_seed(11)
    st = _store(device)
    scale = D ** -0.5
    w = BatchPrefillWithSphKVPagedKVCacheWrapper(tiers=st.wrapper_tiers, backend=backend)
    # req_to_token rows: A owns pages 1..3, B shares A's pages 1, 2 and owns 4, 5; C owns 6.
    rows = torch.zeros(3, 8 * P, dtype=torch.int64)
    rows[0, :4 * P] = torch.arange(P, 5 * P)
    rows[1, :2 * P] = torch.arange(P, 3 * P)
    rows[1, 2 * P:4 * P] = torch.arange(4 * P, 6 * P)
    rows[2, :2 * P] = torch.arange(6 * P, 8 * P)
    # prefill A (40 tokens: pages 1, 2 coded directly, page 3 staged) and C (21 tokens)
    for r, n in ((0, 40), (2, 21)):
        loc = rows[r, :n]
        k, v = _kv(n, g)
        for layer in range(L):
            st.write(layer, loc.to(device), k.to(device), v.to(device))
    st.demote(torch.tensor([1]), to_tier=1)                   # page 1 (shared by A and B) in the low tier
    # extend B over the shared coded prefix (32 tokens) with 20 new tokens; A and C decode in the same batch
    lens = torch.tensor([40, 32, 21])
    q_lens = [1, 20, 1]
    qo = [0, 1, 21, 22]
    pp = st.plan_pages(rows, lens)
    assert sorted(set(pp["page_tiers"].tolist())) == [0, 1, 2]                  # staging + both coded tiers
    w.plan(torch.tensor(qo), pp["indptr"], pp["indices"], pp["page_tiers"], None, H * G, H, D, P,
           page_lens=pp["page_lens"], device=device)
    for layer in range(L):
        q = torch.randn(qo[-1], H * G, D, generator=g).to(torch.bfloat16)
        out, lse = w.run(q.to(device), st.layer_cache(layer), sm_scale=scale, return_lse=True)
        ref = _oracle(st, layer, q, rows, lens.tolist(), qo, scale)
        torch.testing.assert_close(out.double().cpu(), ref, **_tol(device))
        assert bool(torch.isfinite(lse).all())
    new = torch.cat([rows[0, 40:41], rows[1, 32:52], rows[2, 21:22]])
    k, v = _kv(new.numel(), g)
    for layer in range(L):
        st.write(layer, new.to(device), k.to(device), v.to(device))
    # decode steps, the way the backend does them: bookkeeping, write, plan, run; a second wrapper runs
    # the static-shape, host-sync-free plan (padded rows, preallocated buffers) and must agree
    lens = torch.tensor([41, 52, 22])
    w_static = BatchPrefillWithSphKVPagedKVCacheWrapper(tiers=st.wrapper_tiers, backend=backend)
    max_pages = rows.shape[1] // P
    rows_dev = rows.to(device)
    bufs = {k: torch.zeros(n, dtype=dt, device=device) for k, n, dt in (
        ("indptr", 3 * H + 1, torch.int32), ("indices", 3 * H * max_pages, torch.int32),
        ("page_lens", 3 * H * max_pages, torch.int32), ("page_tiers", 3 * H * max_pages, torch.int64),
        ("pages", 3 * H * max_pages, torch.int64))}
    ptrs = {k: t.data_ptr() for k, t in bufs.items()}
    for step in range(3):
        loc = torch.stack([rows[b, lens[b]] for b in range(3)])
        st.begin_forward(loc.to(device))
        lens = lens + 1
        pp = st.plan_pages(rows, lens)
        w.plan(torch.arange(4), pp["indptr"], pp["indices"], pp["page_tiers"], None, H * G, H, D, P,
               page_lens=pp["page_lens"], device=device)
        lens_dev = lens.to(device)                                 # the host-to-device copy is not the plan's
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")                # any host sync in the plan raises
        try:
            ps = st.plan_pages_static(rows_dev, lens_dev, max_pages, out=bufs)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        assert {k: t.data_ptr() for k, t in ps.items()} == ptrs                  # fixed addresses
        assert ps["page_lens"].sum().item() == int(lens.sum()) * H
        real = ps["page_lens"] > 0
        assert ps["page_tiers"][real].tolist() == pp["page_tiers"].tolist()     # same entries, same order
        assert ps["indices"][real].tolist() == pp["indices"].tolist()
        w_static.plan(torch.arange(4), ps["indptr"], ps["indices"], ps["page_tiers"], None, H * G, H, D, P,
                      page_lens=ps["page_lens"], device=device)
        k, v = _kv(3, g)
        for layer in range(L):
            st.write(layer, loc.to(device), k.to(device), v.to(device))
            q = torch.randn(3, H * G, D, generator=g).to(torch.bfloat16)
            out = w.run(q.to(device), st.layer_cache(layer), sm_scale=scale)
            ref = _oracle(st, layer, q, rows, lens.tolist(), [0, 1, 2, 3], scale)
            torch.testing.assert_close(out.double().cpu(), ref, **_tol(device))
            out_s = w_static.run(q.to(device), st.layer_cache(layer), sm_scale=scale)
            torch.testing.assert_close(out_s, out, atol=1e-5, rtol=1e-5)
    st.table.check()


@pytest.mark.skipif(not cpu_decode.available(), reason="no C++ compiler for the CPU kernels")
def test_seam_cpu_kernels():
    _run_seam("cpu", "cpu")


def test_seam_reference():
    _run_seam("cpu", "reference")


@pytest.mark.gpu
def test_seam_cuda_triton():
    """Same batches on a GPU: the Triton decode kernels behind the wrapper (one row per query token)."""
    _run_seam("cuda", "triton")


@pytest.mark.gpu
def test_ragged_new_token_attention_cuda():
    """The backend's batched extend path below SGLang on a GPU: ``sphkv_sglang.ragged.ragged_attention`` (the new
    tokens of every request among themselves, one padded-batch call per length group) on CUDA against the
    per-request float32 loop on the CPU, on random ragged batches (odd lengths, an empty request, a decode row,
    GQA 9/3 and 4/4, causal and bidirectional, soft-capping), bf16 and float32 inputs."""
    from sphkv_sglang.ragged import ragged_attention, ragged_attention_reference

    gen = torch.Generator().manual_seed(23)
    for case in range(6):
        lens = [int(x) for x in torch.randint(0, 90, (int(torch.randint(2, 8, (1,), generator=gen)),), generator=gen)]
        lens[0], lens[-1] = 1, 0 if case % 2 else lens[-1]
        hq, hkv = (9, 3) if case % 3 else (4, 4)
        T = sum(lens)
        for dtype in (torch.bfloat16, torch.float32):
            q = torch.randn(T, hq, 64, generator=gen).to(dtype)
            k, v = (torch.randn(T, hkv, 64, generator=gen).to(dtype) for _ in range(2))
            for causal, cap in ((True, 0.0), (False, 0.0), (True, 8.0)):
                o_ref, lse_ref = ragged_attention_reference(q, k, v, lens, scale=0.125, causal=causal, cap=cap)
                o, lse = ragged_attention(q.cuda(), k.cuda(), v.cuda(), lens, scale=0.125, causal=causal, cap=cap,
                                          compute_dtype=torch.float32)
                assert o.device.type == "cuda" and o.dtype == lse.dtype == torch.float32
                # float32 math on both sides (TF32 off by default for matmul): only summation order differs
                torch.testing.assert_close(o.cpu(), o_ref, atol=1e-4, rtol=0)
                torch.testing.assert_close(lse.cpu(), lse_ref, atol=1e-4, rtol=0)
