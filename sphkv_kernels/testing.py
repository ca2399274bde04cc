# SPDX-License-Identifier: Apache-2.0
"""Test and benchmark helpers: random tiered paged caches and a float64 dense oracle.

Not used by the kernels themselves. :func:`use_interpreter_if_no_cuda` switches the kernels to
Triton's CPU interpreter (and reloads the kernel modules so their ``@triton.jit`` functions are
interpreted) when no GPU is present.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sphkv.pool import TierPool
from sphkv.tiers import Tier

__all__ = ["RandomCache", "random_paged_cache", "dense_oracle", "use_interpreter_if_no_cuda", "poison", "fill_random"]

_KERNEL_MODULES = ("sphkv_kernels._decode_kernels", "sphkv_kernels._coded_rowwise_kernels",
                   "sphkv_kernels._encode_kernels")


@contextlib.contextmanager
def use_interpreter_if_no_cuda():
    """Yield the device kernels run on: ``"cuda"`` if available, else ``"cpu"`` with ``TRITON_INTERPRET=1``
    set for the duration (restored afterwards)."""
    if torch.cuda.is_available():
        yield "cuda"
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in _KERNEL_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
        yield "cpu"
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def fill_random(pool: TierPool) -> None:
    """Fill every tensor of ``pool`` with random, never-zero content (benchmarks: realistic radii and scales)."""
    for name, t in pool.tensors().items():
        if t.dtype == torch.uint8:
            t.random_()
        elif name == "k_radius":
            t.uniform_(5, 15)
        elif name == "v_scale":
            t.uniform_(0.01, 0.1)
        else:
            t.normal_()


def poison(*tensors: torch.Tensor) -> None:
    """Fill float tensors with NaN (and integer ones with 0xAB) so unwritten outputs show."""
    for t in tensors:
        if t is None:
            continue
        if t.is_floating_point():
            t.fill_(float("nan"))
        else:
            t.fill_(0xAB)


@dataclass
class RandomCache:
    """A random batch over tier pools; entry arrays use the plan vocabulary of :mod:`sphkv_kernels.schedule`."""

    pools: list[TierPool]
    indptr: torch.Tensor           # [B*Hkv + 1] int32
    indices: torch.Tensor          # [nnz] int32
    page_tiers: torch.Tensor       # [nnz] int32
    page_lens: torch.Tensor        # [nnz] int32
    last_page_len: torch.Tensor    # [B*Hkv] int32 (== page_lens of each row's last entry)
    batch_size: int
    num_kv_heads: int


def random_paged_cache(tiers: Sequence[Tier], *, seq_lens: Sequence[int], num_kv_heads: int, head_dim: int,
                       page_size: int, device="cpu", seed: int = 0, partial_pages: bool = True,
                       fill: str = "encode") -> RandomCache:
    """Random keys/values for ``len(seq_lens)`` requests, paged per (request, kv head) over ``tiers``.

    Row ``(b, h)`` holds ``seq_lens[b] - h`` tokens (at least 1). The first and last pages of a row
    go to tier 0 (the sink and the recent window, typically dense); the others cycle at random over
    all tiers. With ``partial_pages`` some interior pages are partial (as after retention). Keys
    have a per-head mean offset and spread like real post-RoPE keys. ``fill="encode"`` writes the
    pages through :meth:`TierPool.write` (the reference codec); ``fill="random"`` fills the arenas
    with random bytes (valid codes, for benchmarks).
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(seq_lens):
        for h in range(num_kv_heads):
            rows.append((b, h, max(1, int(n) - h)))
    entries = []                       # (row, tier, len)
    counts = []
    for r, (b, h, n) in enumerate(rows):
        lens, left = [], n
        while left > 0:
            take = page_size
            if partial_pages and left > page_size and float(torch.rand((), generator=g)) < 0.25:
                take = int(torch.randint(1, page_size, (), generator=g))
            take = min(take, left)
            lens.append(take)
            left -= take
        for i, ln in enumerate(lens):
            t = 0 if i in (0, len(lens) - 1) else int(torch.randint(0, len(tiers), (), generator=g))
            entries.append((r, t, ln))
        counts.append(len(lens))
    per_tier = [sum(1 for e in entries if e[1] == t) for t in range(len(tiers))]
    pools = [TierPool(t, per_tier[i] + 1, head_dim=head_dim, page_size=page_size, device=device)
             for i, t in enumerate(tiers)]
    next_id = [1] * len(tiers)
    indices, tiers_of, lens_of = [], [], []
    mean = torch.randn(num_kv_heads, head_dim, generator=g) * 2
    for r, t, ln in entries:
        pid = next_id[t]
        next_id[t] += 1
        indices.append(pid)
        tiers_of.append(t)
        lens_of.append(ln)
        if fill == "encode":
            h = rows[r][1]
            k = mean[h] + torch.randn(ln, head_dim, generator=g) * (1 + torch.rand(head_dim, generator=g))
            v = torch.randn(ln, head_dim, generator=g)
            pools[t].write(pid, k.to(device), v.to(device))
    if fill == "random":
        for pool in pools:
            for name, ten in pool.tensors().items():
                if ten.dtype == torch.uint8:
                    ten.copy_(torch.randint(0, 256, ten.shape, generator=g, dtype=torch.uint8))
                elif name == "k_radius":
                    ten.copy_((torch.rand(ten.shape, generator=g) * 10 + 5).to(ten.dtype))
                elif name == "v_scale":
                    ten.copy_((torch.rand(ten.shape, generator=g) * 0.2 + 0.05).to(ten.dtype))
                elif name == "v_zero":
                    ten.copy_((-torch.rand(ten.shape, generator=g) * 2).to(ten.dtype))
                else:
                    ten.copy_(torch.randn(ten.shape, generator=g).to(ten.dtype))
    indptr = torch.tensor([0] + list(torch.cumsum(torch.tensor(counts), 0)), dtype=torch.int32)
    page_lens = torch.tensor(lens_of, dtype=torch.int32)
    return RandomCache(pools=pools, indptr=indptr.to(device), indices=torch.tensor(indices, dtype=torch.int32).to(device),
                       page_tiers=torch.tensor(tiers_of, dtype=torch.int32).to(device), page_lens=page_lens.to(device),
                       last_page_len=page_lens[indptr[1:].long() - 1].to(device), batch_size=len(seq_lens),
                       num_kv_heads=num_kv_heads)


def _row_kv(cache: RandomCache, r: int):
    """Decoded keys/values ``[n, d]`` float64 (original domain) of row ``r``, and the entry of each token."""
    ks, vs, ent = [], [], []
    lo, hi = int(cache.indptr[r]), int(cache.indptr[r + 1])
    for e in range(lo, hi):
        t, pid, n = int(cache.page_tiers[e]), int(cache.indices[e]), int(cache.page_lens[e])
        pool = cache.pools[t]
        if pool.tier.dense:
            ks.append(pool.k[pid, :n].double())
            vs.append(pool.v[pid, :n].double())
        else:
            kc, vc, mean = pool.read(torch.tensor([pid]), torch.tensor([n]))
            k_rot = pool.kcodec.decode_rotated(kc).double() + mean.double()
            ks.append(k_rot @ pool.kcodec.rotation.to(k_rot.device).double())
            vs.append(pool.vquant.decode(vc).double())
        ent.extend([(e, s) for s in range(n)])
    return torch.cat(ks).cpu(), torch.cat(vs).cpu(), ent


def dense_oracle(q: torch.Tensor, cache: RandomCache, *, sm_scale: float, key_mass: bool = False):
    """Float64 attention over the decoded cache: ``out [B, Hq, d]`` and ``lse [B, Hq]`` (natural log),
    plus ``mass [nnz, page_size]`` (summed over each group's query heads) when ``key_mass``."""
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    grp = hq // hkv
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    lse = torch.zeros(b, hq, dtype=torch.float64)
    p_size = cache.pools[0].page_size
    mass = torch.zeros(cache.indices.numel(), p_size, dtype=torch.float64)
    qd = q.double().cpu()
    for r in range(b * hkv):
        bi, h = divmod(r, hkv)
        k, v, ent = _row_kv(cache, r)
        s = qd[bi, h * grp:(h + 1) * grp] @ k.T * sm_scale
        lse[bi, h * grp:(h + 1) * grp] = torch.logsumexp(s, -1)
        p = torch.softmax(s, -1)
        out[bi, h * grp:(h + 1) * grp] = p @ v
        if key_mass:
            for i, (e, slot) in enumerate(ent):
                mass[e, slot] = p[:, i].sum()
    return (out, lse, mass) if key_mass else (out, lse)
