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

from .masks import Visibility
from .segments import DenseSegment, Segment

__all__ = ["segment_attention", "sphkv_attention_forward", "install", "ATTN_NAME", "REFUSED_KWARGS"]

ATTN_NAME = "sphkv"


def _all_dense(segments: list[Segment]) -> bool:
    return all(isinstance(s, DenseSegment) and s.lengths is None for s in segments)


def _allowed(visibility: Visibility, segments: list[Segment], tail_len: int, tail_start: int | None,
             m: int, device) -> list[torch.Tensor]:
    """Per part (each segment, then the tail) ``[B|1, Hkv|1, M, N_i]`` bool: which slots each query may see.

    A segment without ``positions`` (a prefix built by hand) is accepted only where every query sees every
    position before the tail (plain causal); otherwise there is no way to mask it and it raises.
    """
    if tail_start is None:
        raise ValueError("tail_start is needed to apply a mask to the dense tail")
    out = []
    for i, seg in enumerate(segments):
        if seg.positions is not None:
            out.append(visibility.allowed(seg.positions.to(device)))
        elif visibility.sees_all_before(tail_start):
            out.append(torch.ones(1, 1, m, seg.num_tokens, dtype=torch.bool, device=device))
        else:
            raise ValueError(f"segment {i} ({type(seg).__name__}) carries no positions: a mask (sliding window, "
                             "padding, chunks) cannot be applied to it; build segments with positions=")
    out.append(visibility.allowed(torch.arange(tail_start, tail_start + tail_len, device=device)[None, None]))
    return out


def _softcap(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap · tanh(s / softcap)`` on finite logits; masked (-inf) slots stay -inf."""
    if softcap is None:
        return s
    return torch.where(torch.isneginf(s), s, torch.tanh(s / softcap) * softcap)


def _unmask_empty_rows(allowed: torch.Tensor) -> torch.Tensor:
    """Rows with no visible key (queries at pad positions) see everything instead: finite garbage, not NaN."""
    return allowed | ~allowed.any(-1, keepdim=True)


def _sdpa(q, segments, tail_k, tail_v, scale, causal, allowed=None):
    b, hq, m, d = q.shape
    ks = [s.k for s in segments] + [tail_k]
    vs = [s.v for s in segments] + [tail_v]
    k = torch.cat([x.to(torch.float32) for x in ks], -2)
    v = torch.cat([x.to(torch.float32) for x in vs], -2)
    n, t = k.shape[-2] - tail_k.shape[-2], tail_k.shape[-2]
    mask, is_causal = None, False
    if allowed is not None:                                       # [B|1, Hkv|1, M, N]
        mask = _unmask_empty_rows(allowed)
        if mask.shape[1] > 1 and mask.shape[1] != hq:
            mask = mask.repeat_interleave(hq // mask.shape[1], 1)
    elif causal and m > 1:
        if n == 0 and m == t:
            is_causal = True
        else:
            qpos = t - m + torch.arange(m, device=q.device)
            mask = torch.ones(m, n + t, dtype=torch.bool, device=q.device)
            mask[:, n:] = torch.arange(t, device=q.device)[None, :] <= qpos[:, None]
    return F.scaled_dot_product_attention(q.to(torch.float32), k, v, attn_mask=mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=hq != k.shape[1])


def segment_attention(q: torch.Tensor, segments: list[Segment], tail_k: torch.Tensor, tail_v: torch.Tensor, *,
                      scale: float | None = None, causal: bool = True, return_key_mass: bool = False,
                      softcap: float | None = None, visibility: Visibility | None = None,
                      tail_start: int | None = None):
    """Attention of ``q`` over ``segments`` followed by the dense tail.

    Parameters
    ----------
    q : ``[B, Hq, M, d]`` float — queries (post-RoPE); head ``h`` reads kv head ``h // (Hq / Hkv)``.
    segments : the stored prefix, in order (see :mod:`sphkv_hf.segments`).
    tail_k, tail_v : ``[B, Hkv, T, d]`` — dense tokens after the prefix; the ``M`` queries are its last
        ``M`` tokens and, with ``causal``, each sees the prefix and the tail up to itself.
    return_key_mass : also return a list (one ``[B, Hkv, N_i]`` float32 per segment, then the tail's)
        of the attention probability each key slot received, summed over the group's heads and the queries.
    softcap : logit soft-capping ``softcap · tanh(logit / softcap)`` (Gemma-2), applied before masking.
    visibility : which keys each query may see, by cache position (:class:`sphkv_hf.masks.Visibility`:
        transformers' mask, or causal + sliding window). Every segment must then carry ``positions``,
        and ``tail_start`` is the cache position of the tail's first token. None: ``causal`` as above.

    Returns
    -------
    ``[B, Hq, M, d]`` float32 (and the key masses when asked).
    """
    b, hq, m, d = q.shape
    if hq % tail_k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({tail_k.shape[1]}); "
                         "allowed: any group size Hq / Hkv >= 1 (MHA, GQA, MQA)")
    scale = scale if scale is not None else d ** -0.5
    if visibility is not None and visibility.is_causal_only and causal:
        visibility = None                  # every stored key precedes the queries: the positional rule is causal
    allowed = None
    if visibility is not None:
        allowed = _allowed(visibility, segments, tail_k.shape[-2], tail_start, m, q.device)   # [B|1, Hkv|1, M, N_i]
    if not return_key_mass and softcap is None and _all_dense(segments):
        return _sdpa(q, segments, tail_k, tail_v, scale, causal,
                     None if allowed is None else _broadcast_cat(allowed))
    hkv = tail_k.shape[1]
    g = hq // hkv
    qg = q.to(torch.float32).reshape(b, hkv, g * m, d)                       # [B, Hkv, G*M, d]
    parts = [seg.logits(qg, scale) for seg in segments]                     # [B, Hkv, G*M, N_i]
    t = tail_k.shape[-2]
    s = (qg @ tail_k.to(torch.float32).transpose(-1, -2)) * scale           # [B, Hkv, G*M, T]
    if causal and allowed is None:
        qpos = (t - m + torch.arange(m, device=q.device)).repeat(g)         # query row → tail position
        s = s.masked_fill(torch.arange(t, device=q.device)[None, :] > qpos[:, None], float("-inf"))
    parts.append(s)
    parts = [_softcap(x, softcap) for x in parts]
    if allowed is not None:
        rows = [a.expand(b, hkv, m, a.shape[-1]).unsqueeze(2).expand(b, hkv, g, m, a.shape[-1])
                .reshape(b, hkv, g * m, a.shape[-1]) for a in allowed]      # [B, Hkv, G*M, N_i]
        empty = ~torch.stack([r.any(-1) for r in rows], -1).any(-1)         # [B, Hkv, G*M]
        parts = [x.masked_fill(~(r | empty[..., None]), float("-inf")) for x, r in zip(parts, rows)]
    p = torch.softmax(torch.cat(parts, -1), -1)                              # [B, Hkv, G*M, ΣN + T]
    p = torch.nan_to_num(p, nan=0.0)                                         # rows whose slots are all padding
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


def _broadcast_cat(allowed: list[torch.Tensor]) -> torch.Tensor:
    """Per-part ``[B|1, H|1, M, N_i]`` bool → one ``[B', H', M, ΣN]`` (broadcast to common batch and heads)."""
    b = max(a.shape[0] for a in allowed)
    h = max(a.shape[1] for a in allowed)
    return torch.cat([a.expand(b, h, *a.shape[2:]) for a in allowed], -1)


def _refuse(module: torch.nn.Module, feature: str, *, said: bool = False) -> NotImplementedError:
    """``NotImplementedError`` naming the layer (``module.layer_idx``) and the feature (``said``: already a sentence)."""
    layer = getattr(module, "layer_idx", None)
    where = f"layer {layer} ({type(module).__name__})" if layer is not None else type(module).__name__
    return NotImplementedError(f"sphkv attention, {where}: {feature}" + ("" if said else " is not supported"))


# Attention-function kwargs that change the result and that the sphkv attention does not implement:
# passing one (not None) raises at the first forward, naming the layer and the feature.
REFUSED_KWARGS: dict[str, str] = {
    "s_aux": "attention sinks (learned per-head sink logits, s_aux)",
    "sinks": "attention sinks (learned per-head sink logits, sinks)",
    "cu_seq_lens_q": "packed variable-length sequences (cu_seq_lens_q)",
    "cu_seq_lens_k": "packed variable-length sequences (cu_seq_lens_k)",
    "head_mask": "a head mask (head_mask)",
    "attention_bias": "an additive attention bias (attention_bias)",
    "alibi": "ALiBi position biases (alibi)",
}


def _check_features(module: torch.nn.Module, dropout: float, kwargs: dict) -> None:
    for name, feature in REFUSED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise _refuse(module, feature)
    if getattr(module, "is_causal", True) is False:
        raise _refuse(module, "non-causal attention (encoder, bidirectional or cross-attention, "
                              "module.is_causal=False)")
    if dropout and module.training:
        raise _refuse(module, f"attention dropout in training (dropout={dropout})")


def sphkv_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, sliding_window: int | None = None, softcap: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function (registered as ``"sphkv"`` by :func:`install`).

    ``query`` ``[B, Hq, M, d]``; ``key``/``value`` are what the cache's ``update`` returned: the new
    tokens ``[B, Hkv, M, d]`` tagged with their :class:`sphkv_hf.cache.SphKVLayer`, which attends over
    its segments and dense tail. Untagged keys (no sphkv cache, e.g. ``use_cache=False``) are attended
    densely under the same rules.

    Applies what transformers gives an SDPA attention: ``attention_mask`` (``[B, 1, M, KV]`` bool built by
    transformers' mask functions — causal, sliding window, chunked, padding — or None for plain causal),
    ``sliding_window`` (the layer's window: a sphkv cache layer then keeps only that window) and
    ``softcap`` (logit soft-capping). Features it cannot honour (:data:`REFUSED_KWARGS`, non-causal layers,
    dropout in training, additive biases) raise ``NotImplementedError`` naming the layer and the feature.

    Returns ``([B, M, Hq, d]`` in ``query.dtype``, ``None)``.
    """
    _check_features(module, dropout, kwargs)
    if attention_mask is not None and attention_mask.dim() != 4:
        raise _refuse(module, f"a {attention_mask.dim()}-D attention mask (install() registers the mask "
                              "functions; call it before building the model's masks)")
    layer = getattr(key, "sphkv_layer", None)
    try:
        if layer is None:
            n, m = key.shape[-2], query.shape[-2]
            vis = Visibility.for_queries(n, m, mask=attention_mask, window=sliding_window, device=query.device)
            out = segment_attention(query, [], key, value, scale=scaling, softcap=softcap, visibility=vis,
                                    tail_start=0)
        else:
            out = layer.attend(query, scaling, mask=attention_mask, sliding_window=sliding_window, softcap=softcap)
    except NotImplementedError as e:
        raise _refuse(module, str(e), said=True) from e
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def install() -> str:
    """Register :func:`sphkv_attention_forward` as ``"sphkv"`` with transformers' ``AttentionInterface``, and
    SDPA's mask builder under the same name with its ``AttentionMaskInterface``.

    transformers builds no mask for an attention name its mask interface does not know (no causal, sliding,
    chunked or padding mask reaches the attention); registered with ``sdpa_mask`` the sphkv attention gets
    exactly the boolean masks SDPA would get. Idempotent. Returns the name to pass as ``attn_implementation``.
    Importing this package does not call it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, sphkv_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return ATTN_NAME
