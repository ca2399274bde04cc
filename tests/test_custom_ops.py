# SPDX-License-Identifier: Apache-2.0
"""``torch.library.opcheck`` for every custom op of ``flashinfer_ext.ops`` on the CPU.

The arguments are not made up: a real decode (a dense tier and two coded tiers, key mass on) and a
real page encode run through the FlashInfer-style wrappers under a dispatch mode that records every
call into the ``sphkv_kernels`` namespace (inputs cloned before the call). Each recorded call is then
checked by ``opcheck`` — schema and mutation annotations (the op must mutate exactly what it
declares), the fake implementation, autograd registration and AOT dispatch — with the ``reference``
backend. A new op registered in the namespace without being reached here fails the coverage test.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashinfer_ext import BatchDecodeWithSphKVPagedKVCacheWrapper, SphKVPageEncoder
from flashinfer_ext.ops import NAMESPACE, config_key
from sphkv import SphKVConfig
from sphkv.pool import TierPool
from sphkv.tiers import Tier, TierSet
from sphkv_kernels.testing import random_paged_cache

TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _registered_ops() -> set[str]:
    return {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
            if name.startswith(NAMESPACE + "::")}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: dict[str, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == NAMESPACE and func.__name__.split(".")[0] not in self.calls:
            clone = lambda x: x.clone() if isinstance(x, torch.Tensor) else x   # noqa: E731
            self.calls[func.__name__.split(".")[0]] = (func, tuple(map(clone, args)),
                                                       {k: clone(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def recorded():
    torch.manual_seed(0)
    ts = TierSet.default(head_dim=64, page_size=16)
    cache = random_paged_cache(ts.tiers, seq_lens=[40, 23], num_kv_heads=2, head_dim=64, page_size=16,
                               device="cpu", seed=3)
    w = BatchDecodeWithSphKVPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8), tiers=ts,
                                                backend="reference")
    w.plan(cache.indptr, cache.indices, cache.page_tiers, cache.last_page_len, 6, 2, 64, 16,
           page_lens=cache.page_lens, key_mass=True)
    q = torch.randn(2, 6, 64).to(torch.bfloat16)
    mass = torch.zeros(cache.indices.numel(), 16)
    tier = Tier("sphkv-4", SphKVConfig.from_name("sphkv-4", head_dim=64, page_size=16))
    pool = TierPool(tier, 3, head_dim=64, page_size=16)
    rec = _Recorder()
    with rec:
        out, lse = w.run(q, cache.pools, return_lse=True, key_mass_out=mass)
        # the per-row query rotation + level-1 tables (the wrapper calls it with the Triton backend only)
        ops = getattr(torch.ops, NAMESPACE)
        ops.coded_row_tables(q, torch.empty(2, 6, 64), torch.empty(2 * 2 * 32 * 16 * 4), config_key(tier.config), 2,
                             0.125, False, "reference")
        SphKVPageEncoder(tier, backend="reference").encode(
            torch.randn(2, 16, 64), torch.randn(2, 16, 64), torch.tensor([0, 2], dtype=torch.int32),
            torch.tensor([16, 5], dtype=torch.int32), pool)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    return rec.calls


def test_every_registered_op_is_opchecked(recorded):
    ops = _registered_ops()
    assert {"coded_decode_partial", "dense_decode_partial", "merge_partials", "encode_pages"} <= ops
    assert ops == set(recorded), f"ops without an opcheck case: {sorted(ops - set(recorded))}"


@pytest.mark.parametrize("name", ["coded_decode_partial", "dense_decode_partial", "merge_partials", "encode_pages"])
def test_opcheck(recorded, name):
    func, args, kwargs = recorded[name]
    assert "reference" in args or "reference" in kwargs.values()
    torch.library.opcheck(func, args, kwargs, test_utils=TEST_UTILS)


@pytest.mark.parametrize("name", ["coded_decode_partial", "encode_pages"])
def test_ops_mutate_their_outputs(recorded, name):
    """The declared outputs really are written (a no-op implementation would pass a schema check)."""
    func, args, kwargs = recorded[name]
    schema = func._schema
    fresh = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    mutable = [i for i, arg in enumerate(schema.arguments)
               if i < len(fresh) and arg.alias_info is not None and arg.alias_info.is_write
               and isinstance(fresh[i], torch.Tensor)]
    for i in mutable:
        fresh[i].fill_(7)                                # a value no real write leaves everywhere
    before = [fresh[i].clone() for i in mutable]
    func(*fresh, **kwargs)
    changed = [schema.arguments[i].name for i, b in zip(mutable, before) if not torch.equal(fresh[i], b)]
    assert changed, f"{name} wrote none of {[schema.arguments[i].name for i in mutable]}"
