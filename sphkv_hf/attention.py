# SPDX-License-Identifier: Apache-2.0
"""Attention over a segmented prefix plus a dense tail, and the transformers attention function.

:func:`segment_attention` generalizes :func:`sphkv.attention_from_codes` to a list of segments
(dense or coded, possibly padded per kv head): each segment contributes its own logits (coded
segments from the angle codes), one softmax runs over all of them and the causal dense tail.
When every segment is dense and unpadded it calls ``torch.nn.functional.scaled_dot_product_attention``.

:func:`sphkv_attention_forward` is the function registered under the name ``"sphkv"`` by
:func:`install`; a model set to ``attn_implementation="sphkv"`` and given a
:class:`sphkv_hf.SphKVCache` runs its attention through the cache's segments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .segments import DenseSegment, Segment

__all__ = ["segment_attention", "sphkv_attention_forward", "install", "ATTN_NAME"]

ATTN_NAME = "sphkv"


def _all_dense(segments: list[Segment]) -> bool:
    return all(isinstance(s, DenseSegment) and s.lengths is None for s in segments)


def _sdpa(q, segments, tail_k, tail_v, scale, causal):
    b, hq, m, d = q.shape
    ks = [s.k for s in segments] + [tail_k]
    vs = [s.v for s in segments] + [tail_v]
    k = torch.cat([x.to(torch.float32) for x in ks], -2)
    v = torch.cat([x.to(torch.float32) for x in vs], -2)
    n, t = k.shape[-2] - tail_k.shape[-2], tail_k.shape[-2]
    mask, is_causal = None, False
    if causal and m > 1:
        if n == 0 and m == t:
            is_causal = True
        else:
            qpos = t - m + torch.arange(m, device=q.device)
            mask = torch.ones(m, n + t, dtype=torch.bool, device=q.device)
            mask[:, n:] = torch.arange(t, device=q.device)[None, :] <= qpos[:, None]
    return F.scaled_dot_product_attention(q.to(torch.float32), k, v, attn_mask=mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=hq != k.shape[1])


def segment_attention(q: torch.Tensor, segments: list[Segment], tail_k: torch.Tensor, tail_v: torch.Tensor, *,
                      scale: float | None = None, causal: bool = True, return_key_mass: bool = False):
    """Attention of ``q`` over ``segments`` followed by the dense tail.

    Parameters
    ----------
    q : ``[B, Hq, M, d]`` float — queries (post-RoPE); head ``h`` reads kv head ``h // (Hq / Hkv)``.
    segments : the stored prefix, in order (see :mod:`sphkv_hf.segments`).
    tail_k, tail_v : ``[B, Hkv, T, d]`` — dense tokens after the prefix; the ``M`` queries are its last
        ``M`` tokens and, with ``causal``, each sees the prefix and the tail up to itself.
    return_key_mass : also return a list (one ``[B, Hkv, N_i]`` float32 per segment, then the tail's)
        of the attention probability each key slot received, summed over the group's heads and the queries.

    Returns
    -------
    ``[B, Hq, M, d]`` float32 (and the key masses when asked).
    """
    b, hq, m, d = q.shape
    scale = scale if scale is not None else d ** -0.5
    if not return_key_mass and _all_dense(segments):
        return _sdpa(q, segments, tail_k, tail_v, scale, causal)
    hkv = tail_k.shape[1]
    g = hq // hkv
    qg = q.to(torch.float32).reshape(b, hkv, g * m, d)                       # [B, Hkv, G*M, d]
    parts = [seg.logits(qg, scale) for seg in segments]                     # [B, Hkv, G*M, N_i]
    t = tail_k.shape[-2]
    s = (qg @ tail_k.to(torch.float32).transpose(-1, -2)) * scale           # [B, Hkv, G*M, T]
    if causal:
        qpos = (t - m + torch.arange(m, device=q.device)).repeat(g)         # query row → tail position
        s = s.masked_fill(torch.arange(t, device=q.device)[None, :] > qpos[:, None], float("-inf"))
    parts.append(s)
    p = torch.softmax(torch.cat(parts, -1), -1)                              # [B, Hkv, G*M, ΣN + T]
    out, start, masses = 0.0, 0, []
    for seg, part in zip(segments + [None], parts):
        n = part.shape[-1]
        pi = p[..., start:start + n]
        out = out + (seg.mix(pi) if seg is not None else pi @ tail_v.to(torch.float32))
        if return_key_mass:
            masses.append(pi.sum(-2))
        start += n
    out = out.reshape(b, hq, m, d)
    return (out, masses) if return_key_mass else out


def _plain_mask(attention_mask) -> bool:
    """True when the mask adds nothing to causal attention (None, or a 2-D all-ones padding mask)."""
    if attention_mask is None:
        return True
    return attention_mask.dim() == 2 and bool(attention_mask.bool().all())


def sphkv_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function (registered as ``"sphkv"``).

    ``query`` ``[B, Hq, M, d]``; ``key``/``value`` are what the cache's ``update`` returned: the new
    tokens ``[B, Hkv, M, d]`` tagged with their :class:`sphkv_hf.cache.SphKVLayer`, which attends over
    its segments and dense tail. Untagged keys (no sphkv cache, e.g. ``use_cache=False``) get dense
    causal SDPA. Padding masks (batched prompts of unequal length) are not supported.

    Returns ``([B, M, Hq, d]`` in ``query.dtype``, ``None)``.
    """
    if not _plain_mask(attention_mask):
        raise NotImplementedError("sphkv attention supports no padding mask: run one sequence or equal lengths")
    layer = getattr(key, "sphkv_layer", None)
    if layer is None:
        out = _sdpa(query, [], key, value, scaling if scaling is not None else query.shape[-1] ** -0.5,
                    causal=getattr(module, "is_causal", True))
    else:
        out = layer.attend(query, scaling)
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def install() -> str:
    """Register :func:`sphkv_attention_forward` with transformers' ``AttentionInterface`` as ``"sphkv"``.

    Idempotent. Returns the name to pass as ``attn_implementation``. Importing this package does not call it.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, sphkv_attention_forward)
    return ATTN_NAME
