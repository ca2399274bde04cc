# SPDX-License-Identifier: Apache-2.0
"""Attention of one request over its cached prefix (tiered coded pages + dense staged tokens) and
its new tokens — the pure-PyTorch reference the CPU server runs.

:func:`prefix_attention` is the single seam where a CUDA build would call the paged ADA kernels
through the ``flashinfer_ext`` wrappers (``plan()`` once per batch, ``run()`` per layer); until that
lands every device uses the reference below and says so once in the log.
"""
from __future__ import annotations

import logging

import torch

from sphkv.logits import logits_adc, logits_lut

from .store import PrefixView, SphKVStore

__all__ = ["prefix_attention", "reference_attention"]

logger = logging.getLogger(__name__)
_LUT_MAX_ROWS = 16          # query rows per KV head up to which the gather recurrence beats ADC GEMMs
_announced = False


def prefix_attention(q: torch.Tensor, view: PrefixView, new_k: torch.Tensor, new_v: torch.Tensor,
                     store: SphKVStore, *, scale: float, causal: bool = True, logit_cap: float = 0.0,
                     return_mass: bool = False):
    """Attention for ``M`` new tokens of one request (see :func:`reference_attention` for shapes).

    The seam for the GPU path: the ``flashinfer_ext`` paged wrappers are not wired yet, so every
    device runs :func:`reference_attention` (logged once).
    """
    global _announced
    if not _announced:
        logger.info("sphkv: attention runs the pure-torch reference path (sphkv_sglang.reference) on %s; "
                    "the Triton/flashinfer_ext path is not wired in this build", q.device)
        _announced = True
    return reference_attention(q, view, new_k, new_v, store, scale=scale, causal=causal,
                               logit_cap=logit_cap, return_mass=return_mass)


def reference_attention(q: torch.Tensor, view: PrefixView, new_k: torch.Tensor, new_v: torch.Tensor,
                        store: SphKVStore, *, scale: float, causal: bool = True, logit_cap: float = 0.0,
                        return_mass: bool = False, block: int = 256):
    """Softmax attention over coded segments + dense tail, in query blocks of ``block``.

    Parameters
    ----------
    q : ``[M, Hq, d]`` — queries of the ``M`` new tokens; head ``h`` reads KV head ``h // (Hq/Hkv)``.
    view : the prefix (coded segments ``[Hkv, N_s, ...]`` and dense staged tokens ``[Hkv, T_p, d]``).
    new_k, new_v : ``[M, Hkv, d]`` — the new tokens' keys and values (dense).
    causal : new token ``i`` sees the whole prefix and new tokens ``0..i``.
    return_mass : also return ``[(pages [m], mass [m])]`` — attention mass per prefix page summed
        over heads, query rows and tokens of the page (coded and staged pages).

    Returns
    -------
    ``[M, Hq, d]`` float32 (and the page masses when asked).
    """
    m, hq, d = q.shape
    hkv = new_k.shape[1]
    g = hq // hkv
    qg = q.to(torch.float32).transpose(0, 1).reshape(hkv, g, m, d)                 # [Hkv, G, M, d]
    kd, vd = new_k.transpose(0, 1).float(), new_v.transpose(0, 1).float()          # [Hkv, M, d]
    tp = 0
    if view.dense_k is not None:
        tp = view.dense_k.shape[1]
        kd, vd = torch.cat([view.dense_k.float(), kd], 1), torch.cat([view.dense_v.float(), vd], 1)
    segs = view.segments
    vals = [store.vquant[s.tier].decode_storage(s.vcode) for s in segs]             # [Hkv, N_s, d]
    qrot = {}
    out = torch.empty(hkv, g, m, d, dtype=torch.float32, device=q.device)
    mass = [torch.zeros(hkv, s.kcode.num_tokens, device=q.device) for s in segs] + \
        [torch.zeros(hkv, tp, device=q.device)]
    for i0 in range(0, m, block):
        i1 = min(m, i0 + block)
        qb = qg[:, :, i0:i1].reshape(hkv, g * (i1 - i0), d)                      # [Hkv, G*b, d]
        parts = []
        for s in segs:
            codec = store.kcodec[s.tier]
            key = id(codec.rotation)
            if key not in qrot:
                qrot[key] = codec.rotate(qg.reshape(hkv, g * m, d)).reshape(hkv, g, m, d)
            qr = qrot[key][:, :, i0:i1].reshape(hkv, g * (i1 - i0), d)
            fn = logits_lut if qr.shape[1] <= _LUT_MAX_ROWS else logits_adc
            parts.append(fn(qr, s.kcode, codec, rotated=True) * scale)            # [Hkv, G*b, N_s]
        sd = (qb @ kd.transpose(-1, -2)) * scale                                   # [Hkv, G*b, T]
        if causal:
            qpos = (tp + torch.arange(i0, i1, device=q.device)).repeat(g)         # row → tail position
            kpos = torch.arange(kd.shape[1], device=q.device)
            sd = sd.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        parts.append(sd)
        logits = torch.cat(parts, -1)
        if logit_cap > 0:
            logits = logit_cap * torch.tanh(logits / logit_cap)
        p = torch.softmax(logits, -1)
        o, start = 0.0, 0
        for j, s in enumerate(segs):
            n = s.kcode.num_tokens
            pj = p[..., start:start + n]
            o = o + store.vquant[s.tier].from_storage_domain(pj @ vals[j])
            if return_mass:
                mass[j] += pj.sum(1)
            start += n
        o = o + p[..., start:] @ vd
        if return_mass and tp:
            mass[-1] += p[..., start:start + tp].sum(1)
        out[:, :, i0:i1] = o.reshape(hkv, g, i1 - i0, d)
    out = out.reshape(hq, m, d).transpose(0, 1)
    if not return_mass:
        return out
    per_page = [(s.pages, mass[j].sum(0).reshape(-1, store.P).sum(-1)) for j, s in enumerate(segs)]
    if tp:
        per_page.append((view.dense_pages, mass[-1].sum(0)))
    return out, per_page
