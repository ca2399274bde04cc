# SPDX-License-Identifier: Apache-2.0
"""Extend (prefill over a paged, tiered prefix plus new dense tokens): the pure-PyTorch reference.

It decodes the prefix pages of every (request, kv head) row to dense float32 keys/values (coded
tiers through their codecs: a reference path, never a hot loop) and runs causal attention of the new
tokens over ``prefix + new``. Queries see the whole prefix and the new tokens up to themselves. The
GPU form of the prefix part is :mod:`sphkv_kernels.extend_tiles` (through
:class:`flashinfer_ext.BatchPrefillWithSphKVPagedKVCacheWrapper`, ``kernel_options={"extend": "tiles"}``),
tested against this reference.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from sphkv.pool import TierPool

__all__ = ["extend_attention_reference"]


def _row_prefix(pools: Sequence[TierPool], indptr, indices, page_tiers, page_lens, r: int, device):
    ks, vs = [], []
    for e in range(int(indptr[r]), int(indptr[r + 1])):
        pool = pools[int(page_tiers[e])]
        pid, n = torch.tensor([int(indices[e])]), torch.tensor([int(page_lens[e])])
        if int(n) == 0:
            continue
        if pool.tier.dense:
            k, v = pool.read(pid, n)
            ks.append(k.to(torch.float32))
            vs.append(v.to(torch.float32))
        else:
            kc, vc, mean = pool.read(pid, n)
            k_rot = pool.kcodec.decode_rotated(kc) + mean.to(torch.float32)
            ks.append(k_rot @ pool.kcodec.rotation.to(k_rot.device))
            vs.append(pool.vquant.decode(vc))
    d = pools[0].head_dim
    if not ks:
        return torch.zeros(0, d, device=device), torch.zeros(0, d, device=device)
    return torch.cat(ks).to(device), torch.cat(vs).to(device)


def extend_attention_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, qo_indptr: torch.Tensor,
                               pools: Sequence[TierPool], indptr: torch.Tensor, indices: torch.Tensor,
                               page_tiers: torch.Tensor, page_lens: torch.Tensor, *, num_kv_heads: int,
                               sm_scale: float | None = None) -> torch.Tensor:
    """Causal attention of new tokens over their request's paged prefix and themselves.

    Parameters
    ----------
    q : ``[total_q, Hq, d]`` — queries of the new tokens, requests concatenated (``qo_indptr``).
    k_new, v_new : ``[total_q, Hkv, d]`` — keys (post-RoPE) and values of the same new tokens.
    qo_indptr : ``[batch_size + 1]`` int — request ``b`` owns rows ``qo_indptr[b]:qo_indptr[b+1]``.
    pools : tier arenas indexed by ``page_tiers``; indptr ``[batch_size * Hkv + 1]``, indices,
        page_tiers, page_lens ``[nnz]`` — the prefix pages per (request, kv head), as in
        :mod:`sphkv_kernels.schedule`.

    Returns
    -------
    ``[total_q, Hq, d]`` float32.

    Examples
    --------
    >>> from sphkv.tiers import Tier
    >>> pool = TierPool(Tier("dense"), 3, head_dim=16, page_size=4)
    >>> pool.write(1, torch.randn(4, 16), torch.randn(4, 16))
    >>> out = extend_attention_reference(torch.randn(2, 2, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16),
    ...                                  torch.tensor([0, 2]), [pool], torch.tensor([0, 1]), torch.tensor([1]),
    ...                                  torch.tensor([0]), torch.tensor([4]), num_kv_heads=1)
    >>> out.shape
    torch.Size([2, 2, 16])
    """
    total, hq, d = q.shape
    scale = sm_scale if sm_scale is not None else d ** -0.5
    g = hq // num_kv_heads
    out = torch.zeros(total, hq, d, dtype=torch.float32, device=q.device)
    qo = qo_indptr.to(torch.int64).tolist()
    for b in range(len(qo) - 1):
        lo, hi = qo[b], qo[b + 1]
        m = hi - lo
        if m == 0:
            continue
        for h in range(num_kv_heads):
            kp, vp = _row_prefix(pools, indptr, indices, page_tiers, page_lens, b * num_kv_heads + h, q.device)
            k = torch.cat([kp, k_new[lo:hi, h].to(torch.float32)])
            v = torch.cat([vp, v_new[lo:hi, h].to(torch.float32)])
            n_pre = kp.shape[0]
            qh = q[lo:hi, h * g:(h + 1) * g].to(torch.float32).transpose(0, 1)           # [G, m, d]
            s = (qh @ k.T) * scale                                                         # [G, m, n_pre + m]
            causal = torch.arange(n_pre + m, device=q.device)[None, :] > (n_pre + torch.arange(m, device=q.device))[:, None]
            s = s.masked_fill(causal[None], float("-inf"))
            out[lo:hi, h * g:(h + 1) * g] = (torch.softmax(s, -1) @ v).transpose(0, 1)
    return out
