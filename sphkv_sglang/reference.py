# SPDX-License-Identifier: Apache-2.0
"""Attention of one request over its cached prefix (tiered coded pages + dense staged tokens) and
its new tokens — the pure-PyTorch reference the CPU server runs.

:func:`prefix_attention` is the single seam where a CUDA build would call the paged ADA kernels
through the ``flashinfer_ext`` wrappers (``plan()`` once per batch, ``run()`` per layer); until that
lands every device uses the reference below and says so once in the log.

The reference expands a request's coded pages transiently (:mod:`.planes`, per layer, freed at
once), maps them back from the rotated domain, and runs one ``scaled_dot_product_attention`` over
``[coded prefix | staged prefix | new tokens]`` in the model dtype when no page is coded — the same kernel and
key order SGLang's ``torch_native`` backend uses, so a request with no coded page gets bit-identical
attention to a dense server. The attention mass each prefix page receives (RDR's utility signal) is
measured on the last ``mass_window`` queries of the call (all of them in decode).
"""
from __future__ import annotations

import logging

import torch
from torch.nn.functional import scaled_dot_product_attention

from .store import PrefixView, SphKVStore

__all__ = ["prefix_attention", "reference_attention"]

logger = logging.getLogger(__name__)
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


def _gather_kv(view: PrefixView, new_k: torch.Tensor, new_v: torch.Tensor, store: SphKVStore, dtype):
    """Keys and values ``[Hkv, N_prefix + M, d]`` (prefix first) and the prefix tokens' pages.

    Without coded pages everything stays in the original domain (bit-identical to torch_native).
    With coded pages, attention runs in the codec's rotated domain (orthogonal, so logits are
    unchanged): expanded keys stay rotated, the few dense keys are rotated instead, and values stay
    in the value quantizer's storage domain — the caller rotates ``q`` and un-rotates the output.
    Returns ``(k, v, pages, key_rotation | None, value_rotation | None)``.
    """
    segs = view.segments
    rotated = bool(segs) and store.shared_rotation
    rk = store.kcodec[segs[0].tier].rotation.to(new_k.device) if rotated else None
    vq = store.vquant[segs[0].tier] if rotated else None
    ks, vs, pages = [], [], []
    for s in segs:
        y = store.kplanes[s.tier].expand(s.kcode.codes, s.kcode.radius, s.kcode.mean, store.P)   # rotated
        v = store.vplanes[s.tier].expand(s.vcode.codes, s.vcode.scale, s.vcode.zero)            # storage domain
        if not rotated:
            y, v = y @ store.kcodec[s.tier].rotation.to(y.device), store.vquant[s.tier].from_storage_domain(v)
        ks.append(y.to(dtype))
        vs.append(v.to(dtype))
        pages.append(s.pages.repeat_interleave(store.P))
    dense_k, dense_v = [new_k.transpose(0, 1)], [new_v.transpose(0, 1)]
    if view.dense_k is not None:
        dense_k.insert(0, view.dense_k)
        dense_v.insert(0, view.dense_v)
        pages.append(view.dense_pages)
    for dk, dv in zip(dense_k, dense_v):
        if rotated:
            dk, dv = dk.float() @ rk.T, vq.to_storage_domain(dv.float())
        ks.append(dk.to(dtype))
        vs.append(dv.to(dtype))
    return (torch.cat(ks, 1), torch.cat(vs, 1), (torch.cat(pages) if pages else None),
            rk, (vq.rotation.to(new_k.device) if rotated and vq.rotation is not None else None))


def reference_attention(q: torch.Tensor, view: PrefixView, new_k: torch.Tensor, new_v: torch.Tensor,
                        store: SphKVStore, *, scale: float, causal: bool = True, logit_cap: float = 0.0,
                        return_mass: bool = False, mass_window: int = 8):
    """Softmax attention of ``M`` new tokens over ``[prefix | new tokens]``.

    Parameters
    ----------
    q : ``[M, Hq, d]`` — queries of the new tokens; head ``h`` reads KV head ``h // (Hq/Hkv)``.
    view : the cached prefix (coded segments ``[Hkv, N_s, ...]``, dense staged tokens ``[Hkv, T, d]``).
    new_k, new_v : ``[M, Hkv, d]`` — the new tokens' keys and values.
    causal : new token ``i`` sees the whole prefix and new tokens ``0..i``.
    return_mass : also return ``(pages [N_prefix], mass [N_prefix])`` float32 — the attention
        probability each prefix token received from the last ``mass_window`` queries, summed over
        query heads and those queries.

    Returns
    -------
    ``[M, Hq, d]`` in ``q.dtype`` (and the mass when asked).
    """
    m, hq, d = q.shape
    # Coded prefix: float32 (exact expansion, and faster than bf16 SDPA on CPUs without bf16 units);
    # otherwise the model dtype, exactly as torch_native.
    dtype = torch.float32 if view.segments else q.dtype
    k, v, pages, rk, rv = _gather_kv(view, new_k, new_v, store, dtype)             # [Hkv, N+M, d]
    n = k.shape[1] - m
    qh = q.transpose(0, 1).to(dtype)                                               # [Hq, M, d]
    if rk is not None:
        qh = qh @ rk.T
    if logit_cap > 0:
        raise NotImplementedError("sphkv reference attention: logit soft-capping is not supported")
    hkv = k.shape[0]
    g = hq // hkv
    if m == 1 and dtype == torch.float32:          # decode over coded pages: explicit softmax, mass for free
        p = torch.softmax((qh.reshape(hkv, g, d) @ k.transpose(-1, -2)) * scale, -1)    # [Hkv, G, N+1]
        out = (p @ v).reshape(hq, 1, d)
        mass = p[..., :n].sum((0, 1)) if return_mass and n else None
    else:
        if not causal or m == 1:
            mask, is_causal = None, False
        elif n == 0:
            mask, is_causal = None, True
        else:
            mask, is_causal = torch.ones(m, n + m, dtype=torch.bool, device=q.device).tril(n), False  # i sees <= n+i
        out = scaled_dot_product_attention(qh[None], k[None], v[None], attn_mask=mask, is_causal=is_causal,
                                           scale=scale, enable_gqa=hq != hkv)[0]         # [Hq, M, d]
        mass = _window_mass(qh, k, n, scale, causal, mass_window) if return_mass and n else None
    if rv is not None:
        out = out @ rv
    out = out.transpose(0, 1).to(q.dtype)
    if not return_mass:
        return out
    return out, (None if mass is None else (pages, mass))


def _window_mass(qh: torch.Tensor, k: torch.Tensor, n: int, scale: float, causal: bool, window: int) -> torch.Tensor:
    """Attention mass ``[n]`` the prefix keys get from the last ``window`` queries (summed over heads)."""
    hq, m, d = qh.shape
    hkv = k.shape[0]
    g, w = hq // hkv, min(m, window)
    qw = qh[:, m - w:].float().reshape(hkv, g * w, d)                              # [Hkv, G*w, d]
    s = (qw @ k.float().transpose(-1, -2)) * scale                                 # [Hkv, G*w, N+M]
    if causal:
        rows = (n + m - w + torch.arange(w, device=qh.device)).repeat(g)
        s = s.masked_fill(torch.arange(n + m, device=qh.device)[None, :] > rows[:, None], float("-inf"))
    return torch.softmax(s, -1)[..., :n].sum((0, 1))
