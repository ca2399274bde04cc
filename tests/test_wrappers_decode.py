# SPDX-License-Identifier: Apache-2.0
"""The FlashInfer-style wrappers: plan/run over mixed tiers against a float64 dense oracle.

Kernels run on CUDA when present, else under Triton's CPU interpreter (set only while these tests
run); the ``reference`` backend is checked against the same oracle.
"""
from __future__ import annotations

import pytest
import torch

from flashinfer_ext import BatchDecodeWithSphKVPagedKVCacheWrapper, SphKVPageEncoder
from flashinfer_ext.ops import NAMESPACE
from sphkv import SphKVConfig
from sphkv.pool import TierPool
from sphkv.tiers import Tier, TierSet
from sphkv_kernels.testing import dense_oracle, poison, random_paged_cache, use_interpreter_if_no_cuda


@pytest.fixture(scope="module")
def device():
    with use_interpreter_if_no_cuda() as dev:
        yield dev


def _tol(device, backend):
    if backend == "reference" or device == "cpu":
        return dict(atol=1e-4, rtol=1e-4)
    return dict(atol=3e-2, rtol=3e-2)


def _wrapper(tiers, device, backend):
    ws = torch.empty(1 << 22, dtype=torch.uint8, device=device)
    return BatchDecodeWithSphKVPagedKVCacheWrapper(ws, tiers=tiers, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("seq_lens,page_size,group", [
    ([17, 54, 97], 16, 1),
    ([97, 17], 16, 3),
    ([54, 97], 64, 4),
])
def test_decode_matches_oracle(device, backend, seq_lens, page_size, group):
    ts = TierSet.default(head_dim=64, page_size=page_size)
    hkv = 2
    cache = random_paged_cache(ts.tiers, seq_lens=seq_lens, num_kv_heads=hkv, head_dim=64, page_size=page_size,
                               device=device, seed=sum(seq_lens) + group)
    w = _wrapper(ts, device, backend)
    w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, hkv * group, hkv, 64, page_size,
           page_lens=cache.page_lens, pages_per_split=2)
    q = torch.randn(len(seq_lens), hkv * group, 64, device=device).to(torch.bfloat16)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], device=device)
    poison(out, lse)
    res, lse_r = w.run(q, cache.pools, out=out, lse=lse, return_lse=True)
    assert res is out and lse_r is lse
    ref_out, ref_lse = dense_oracle(q.float(), cache, sm_scale=64 ** -0.5)
    tol = _tol(device, backend)
    if q.dtype == torch.bfloat16:           # the output itself is rounded to bf16
        tol = dict(atol=max(tol["atol"], 1e-2), rtol=max(tol["rtol"], 1e-2))
    torch.testing.assert_close(out.double().cpu(), ref_out, **tol)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, **_tol(device, backend))


@pytest.mark.parametrize("row_tables", [0, 1])
def test_row_tables_path_matches_oracle(device, row_tables):
    """Per-row level-1 tables (one launch per coded tier rotating the queries too) and the per-work-item path agree
    with the oracle on a mixed batch: dense, sphkv-4 (row-wise kernel, table launch) and sphkv-2 (not row-wise at
    head_dim 64: its queries are rotated by torch.matmul in the same run)."""
    ts = TierSet.default(head_dim=64, page_size=16)
    cache = random_paged_cache(ts.tiers, seq_lens=[54, 17, 40], num_kv_heads=2, head_dim=64, page_size=16,
                               device=device, seed=11)
    w = _wrapper(ts, device, "auto")
    w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, 6, 2, 64, 16,
           page_lens=cache.page_lens, pages_per_split=2, kernel_options=dict(row_tables=row_tables))
    assert bool(w._plan["tables"]) == bool(row_tables)
    q = torch.randn(3, 6, 64, device=device)
    out = w.run(q, cache.pools)
    ref_out, _ = dense_oracle(q, cache, sm_scale=64 ** -0.5)
    torch.testing.assert_close(out.double().cpu(), ref_out, **_tol(device, "auto"))


@pytest.mark.parametrize("merge_rotation", ["kernel", "pre"])
def test_merge_rotation_placement_matches_oracle(device, merge_rotation):
    """The coded tiers' value rotation inside the merge kernel or applied to their partials before it ("pre": the
    default on CUDA above head_dim 128, where the merge's [d, d] rotation does not fit in shared memory) gives the
    oracle's output on a mixed batch (dense + coded tiers with a value rotation)."""
    ts = TierSet.default(head_dim=64, page_size=16)
    cache = random_paged_cache(ts.tiers, seq_lens=[54, 17, 40], num_kv_heads=2, head_dim=64, page_size=16,
                               device=device, seed=13)
    w = _wrapper(ts, device, "triton")
    w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, 6, 2, 64, 16,
           page_lens=cache.page_lens, pages_per_split=2, kernel_options=dict(merge_rotation=merge_rotation))
    rotated = sum(1 for t in w._plan["present"] if w._layouts[t] is not None and w._layouts[t].value_rotate)
    assert rotated >= 1 and w._plan["merge_backend"] == "triton"
    assert len(w._plan["pre_rot"]) == (rotated if merge_rotation == "pre" else 0)
    assert (w._plan["rotate_mask"] == 0) == (merge_rotation == "pre")
    q = torch.randn(3, 6, 64, device=device)
    out, lse = w.run(q, cache.pools, return_lse=True)
    ref_out, ref_lse = dense_oracle(q, cache, sm_scale=64 ** -0.5)
    torch.testing.assert_close(out.double().cpu(), ref_out, **_tol(device, "triton"))
    torch.testing.assert_close(lse.double().cpu(), ref_lse, **_tol(device, "triton"))
    with pytest.raises(ValueError, match="merge_rotation"):
        w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, 6, 2, 64, 16,
               page_lens=cache.page_lens, kernel_options=dict(merge_rotation="after"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (head_dim 256 is too slow under the interpreter)")
def test_head_dim_256_runs_the_tc_kernel_and_matches_oracle():
    """head_dim 256 on CUDA: ``kernel="auto"`` plans the tensor-core kernel for the coded tier (TC_MIN_HEAD_DIM; no
    row-wise level-1 tables) and the output equals the oracle on a
    dense + sphkv-4 batch; the step captures in a CUDA graph."""
    d, p, hkv, g = 256, 64, 2, 4
    ts = [Tier("dense"),
          Tier("sphkv-4", SphKVConfig.from_name("sphkv-4", head_dim=d, page_size=p))]
    cache = random_paged_cache(ts, seq_lens=[301, 130, 77], num_kv_heads=hkv, head_dim=d, page_size=p,
                               device="cuda", seed=17)
    w = _wrapper(ts, "cuda", "auto")
    w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, hkv * g, hkv, d, p,
           page_lens=cache.page_lens, pages_per_split=2)
    assert '"kernel": "tc"' in w._plan["variants"][1] and not w._plan["tables"]
    q = torch.randn(3, hkv * g, d, device="cuda")
    out, lse = w.run(q, cache.pools, return_lse=True)
    ref_out, ref_lse = dense_oracle(q, cache, sm_scale=d ** -0.5)
    torch.testing.assert_close(out.double().cpu(), ref_out, **_tol("cuda", "triton"))
    torch.testing.assert_close(lse.double().cpu(), ref_lse, **_tol("cuda", "triton"))
    graph_out = torch.empty_like(out)
    w.run(q, cache.pools, out=graph_out)                     # compile outside the capture
    torch.cuda.synchronize()
    g_ = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_):
        w.run(q, cache.pools, out=graph_out)
    graph_out.zero_()
    g_.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graph_out, out, atol=1e-5, rtol=0)


def test_flashinfer_last_page_len_convention(device):
    """Without ``page_lens``, every entry is full except each row's last (``last_page_len``)."""
    ts = TierSet.default(head_dim=64, page_size=16)
    cache = random_paged_cache(ts.tiers, seq_lens=[40, 23], num_kv_heads=1, head_dim=64, page_size=16,
                               device=device, partial_pages=False, seed=7)
    w = _wrapper(ts, device, "auto")
    w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, 4, 1, 64, 16)
    q = torch.randn(2, 4, 64, device=device)
    out = w.run(q.to(torch.bfloat16), cache.pools, sm_scale=0.1)
    ref_out, _ = dense_oracle(q.to(torch.bfloat16).float(), cache, sm_scale=0.1)
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=1e-2, rtol=1e-2)


def test_key_mass_matches_oracle(device):
    ts = TierSet.default(head_dim=64, page_size=16)
    cache = random_paged_cache(ts.tiers, seq_lens=[54, 17], num_kv_heads=2, head_dim=64, page_size=16,
                               device=device, seed=11)
    w = _wrapper(ts, device, "auto")
    w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, 6, 2, 64, 16,
           page_lens=cache.page_lens, pages_per_split=3, key_mass=True)
    q = torch.randn(2, 6, 64, device=device).to(torch.bfloat16)
    mass = torch.full((cache.indices.numel(), 16), float("nan"), device=device)
    w.run(q, cache.pools, key_mass_out=mass)
    _, _, ref_mass = dense_oracle(q.float(), cache, sm_scale=0.125, key_mass=True)
    torch.testing.assert_close(mass.double().cpu(), ref_mass, **_tol(device, "auto"))
    # every row's mass sums to its group size
    row_sum = torch.zeros(4, dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(4), (cache.indptr[1:] - cache.indptr[:-1]).cpu().long()),
        mass.double().cpu().sum(-1))
    torch.testing.assert_close(row_sum, torch.full((4,), 3.0, dtype=torch.float64), atol=1e-3, rtol=1e-3)


def test_plan_run_contract_errors(device):
    ts = TierSet.default(head_dim=64, page_size=16)
    w = _wrapper(ts, device, "auto")
    with pytest.raises(RuntimeError, match="plan"):
        w.run(torch.randn(1, 2, 64, device=device), [None, None, None])
    cache = random_paged_cache(ts.tiers, seq_lens=[20], num_kv_heads=1, head_dim=64, page_size=16, device=device)
    with pytest.raises(ValueError, match="multiple"):
        w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, 3, 2, 64, 16)
    w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, 2, 1, 64, 16,
           page_lens=cache.page_lens)
    with pytest.raises(ValueError, match="as planned"):
        w.run(torch.randn(2, 2, 64, device=device), cache.pools)
    with pytest.raises(ValueError, match="backend"):
        BatchDecodeWithSphKVPagedKVCacheWrapper(torch.empty(8, dtype=torch.uint8), tiers=ts, backend="cuda")


def test_custom_ops_registered_with_fake_impls():
    ns = getattr(torch.ops, NAMESPACE)
    for name in ("coded_decode_partial", "dense_decode_partial", "merge_partials", "encode_pages"):
        assert hasattr(ns, name)
    # opcheck: schema, fake implementation and mutation annotations of the merge op
    po, pl = torch.randn(3, 2, 32), torch.randn(3, 2)
    sp = torch.tensor([[0, 1, 3]], dtype=torch.int32)
    rot = torch.eye(32).expand(2, 32, 32).contiguous()
    out, lse = torch.empty(1, 2, 32), torch.empty(1, 2)
    torch.library.opcheck(ns.merge_partials.default, (po, pl, sp, rot, out, lse, 1, 0, "reference"),
                          test_utils=("test_schema", "test_faketensor"))


def test_page_encoder_writes_like_the_pool(device):
    tier = Tier("sphkv-4", SphKVConfig.from_name("sphkv-4", head_dim=64, page_size=16))
    a = TierPool(tier, 3, head_dim=64, page_size=16, device=device)
    b = TierPool(tier, 3, head_dim=64, page_size=16, device=device)
    k, v = torch.randn(1, 16, 64, device=device) * 3, torch.randn(1, 16, 64, device=device)
    SphKVPageEncoder(tier).encode(k, v, torch.tensor([2], dtype=torch.int32, device=device),
                                  torch.tensor([13], dtype=torch.int32, device=device), a)
    b.write(2, k[0, :13], v[0, :13])
    ka = a.kcodec.decode(_code_with_mean(a, 13))
    kb = b.kcodec.decode(_code_with_mean(b, 13))
    rel = float((ka - kb).norm() / kb.norm())
    assert rel < 0.05, rel
    # values: both writers' codes dequantize to the written values within sphkv-4's int4 error, and to
    # each other; slots past the written length stay untouched (zero)
    from sphkv.values import ValueCode

    def values(pool):
        return pool.vquant.decode(ValueCode(codes=pool.v_codes[2, :13], scale=pool.v_scale[2, :13],
                                            zero=pool.v_zero[2, :13])).float().cpu()

    want = v[0, :13].float().cpu()
    va, vb = values(a), values(b)
    err_a, err_b = float((va - want).norm() / want.norm()), float((vb - want).norm() / want.norm())
    assert err_a < VALUE_TOL and err_b < VALUE_TOL, (err_a, err_b)
    assert float((va - vb).norm() / want.norm()) < 0.02        # the encoder and the pool agree (0.0 on CPU)
    assert not a.v_codes[2, 13:].any() and not a.v_scale[2, 13:].any() and not a.k_radius[2, 13:].any()
    assert not a.v_codes[[0, 1]].any() and not a.k_codes[[0, 1]].any()    # other pages untouched


VALUE_TOL = 0.12   # sphkv-4 int4 values on randn: measured 0.089 relative error


def _code_with_mean(pool, n):
    from sphkv.keys import KeyCode
    return KeyCode(codes=pool.k_codes[2, :n], radius=pool.k_radius[2, :n], mean=pool.k_mean[2:3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_run_is_cuda_graph_capturable():
    ts = TierSet.default(head_dim=128, page_size=64)
    cache = random_paged_cache(ts.tiers, seq_lens=[300, 1000], num_kv_heads=2, head_dim=128, page_size=64,
                               device="cuda", seed=5)
    w = _wrapper(ts, "cuda", "auto")
    w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, 8, 2, 128, 64,
           page_lens=cache.page_lens)
    q = torch.randn(2, 8, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    w.run(q, cache.pools, out=out)                       # warm-up (compiles)
    eager = out.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.run(q, cache.pools, out=out)
    poison(out)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager)
    # replay reads the live inputs: new queries in the captured buffer, same plan -> the oracle's answer
    for seed in (1, 2):
        q.copy_(torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
        poison(out)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, _ = dense_oracle(q.float(), cache, sm_scale=128 ** -0.5)
        torch.testing.assert_close(out.double().cpu(), ref_out, atol=2e-2, rtol=2e-2)


def test_head_dim_32_routes_to_a_working_path(device):
    """d = 32 runs the kernels under the interpreter and the reference on GPU; both match the oracle."""
    tiers = [Tier("dense"), Tier("sphkv-4", SphKVConfig.from_name("sphkv-4", head_dim=32, page_size=16, value_group=32))]
    cache = random_paged_cache(tiers, seq_lens=[54, 17], num_kv_heads=1, head_dim=32, page_size=16, device=device,
                               seed=32)
    w = _wrapper(tiers, device, "auto")
    w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, 3, 1, 32, 16,
           page_lens=cache.page_lens, pages_per_split=2)
    q = torch.randn(2, 3, 32, device=device)
    out = w.run(q, cache.pools)
    ref_out, _ = dense_oracle(q, cache, sm_scale=32 ** -0.5)
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=2e-2, rtol=2e-2)


def test_extend_reference_last_token_equals_decode(device):
    """The extend reference's last new token attends to prefix + all new tokens: equal to a decode
    over the prefix pages plus a dense page holding the new tokens."""
    from sphkv_kernels.extend import extend_attention_reference

    ts = TierSet.default(head_dim=64, page_size=16)
    cache = random_paged_cache(ts.tiers, seq_lens=[40], num_kv_heads=1, head_dim=64, page_size=16, device=device,
                               seed=9)
    m = 5
    q = torch.randn(m, 2, 64, device=device)
    k_new, v_new = torch.randn(m, 1, 64, device=device), torch.randn(m, 1, 64, device=device)
    out = extend_attention_reference(q, k_new, v_new, torch.tensor([0, m]), cache.pools, cache.indptr, cache.indices,
                                     cache.page_tiers, cache.page_lens, num_kv_heads=1, sm_scale=0.125)
    dense = cache.pools[0]
    spare = TierPool(dense.tier, 1, head_dim=64, page_size=16, device=device)
    spare.write(0, k_new[:, 0], v_new[:, 0])
    dense_k = torch.cat([dense.k, spare.k])
    dense_v = torch.cat([dense.v, spare.v])
    pools = [{"k": dense_k, "v": dense_v}, cache.pools[1], cache.pools[2]]
    nnz = cache.indices.numel()
    w = _wrapper(ts, device, "auto")
    w.plan(torch.tensor([0, nnz + 1], dtype=torch.int32, device=device),
           torch.cat([cache.indices, torch.tensor([dense.num_pages], dtype=torch.int32, device=device)]),
           torch.cat([cache.page_tiers, torch.zeros(1, dtype=torch.int32, device=device)]), None, 2, 1, 64, 16,
           page_lens=torch.cat([cache.page_lens.cpu(), torch.tensor([m], dtype=torch.int32)]))
    dec = w.run(q[-1:].contiguous(), pools, sm_scale=0.125)
    torch.testing.assert_close(dec[0].float(), out[-1], atol=2e-2, rtol=2e-2)


def test_cpu_encoder_refuses_non_finite_pages_and_writes_nothing():
    """The C++ CPU encoder has no NaN policy: NaN/Inf input is a clear error and the arena is left untouched."""
    from sphkv.validation import NonFiniteError

    tier = Tier("sphkv-4", SphKVConfig.from_name("sphkv-4", head_dim=64, page_size=16))
    pool = TierPool(tier, 3, head_dim=64, page_size=16)
    before = {n: getattr(pool, n).clone() for n in ("k_codes", "k_radius", "v_codes", "v_scale")}
    enc = SphKVPageEncoder(tier, backend="cpu")
    for bad in ("k", "v"):
        k, v = torch.randn(1, 16, 64), torch.randn(1, 16, 64)
        (k if bad == "k" else v)[0, 5, 7] = float("nan") if bad == "k" else float("inf")
        with pytest.raises(NonFiniteError, match=f"{bad} contains NaN/Inf"):
            enc.encode(k, v, torch.tensor([1], dtype=torch.int32), torch.tensor([16], dtype=torch.int32), pool)
    for n, t in before.items():
        assert torch.equal(getattr(pool, n), t), n
    enc.encode(torch.randn(1, 16, 64), torch.randn(1, 16, 64), torch.tensor([1], dtype=torch.int32),
               torch.tensor([16], dtype=torch.int32), pool)
    assert int((pool.k_radius[1] > 0).sum()) == 16
