# SPDX-License-Identifier: Apache-2.0
"""Reference attention (pure PyTorch, any device): the one softmax state, its exact merge, dense attention
under a visibility mask, and attention over angle-coded keys and quantized values.

Every reference in the project that attends outside a kernel goes through these: the paged-store
reference (:mod:`sphkv.pages.attention`), the SGLang backend's new-token and sliding-window parts, the
``flashinfer_ext`` prefill wrapper's state merge. A *state* is ``(o, lse)``: the normalized output and the
natural-log log-sum-exp of the scores it was computed from (``lse = -inf``, ``o = 0`` when no key is
visible), so two states over disjoint key sets merge exactly (:func:`merge_state`).
"""
from __future__ import annotations

import torch

from .keys import AngleKeyCodec, KeyCode
from .logits import logits_from_codes
from .values import GroupValueQuantizer, ValueCode

__all__ = ["attention_from_codes", "attention_state", "merge_state", "dense_attention", "causal_tail_hidden"]


def attention_state(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax state of ``scores`` ``[..., R, T]`` (scaled, ``-inf`` = hidden) over ``values`` ``[..., T, dv]``.

    Returns ``(o [..., R, dv], lse [..., R])`` float32; rows with every key hidden give ``o = 0``, ``lse = -inf``.
    """
    scores = scores.to(torch.float32)
    lse = torch.logsumexp(scores, -1)
    p = (scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None]).exp_()
    return p @ values.to(torch.float32), lse


def merge_state(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor):
    """Merge two attention states over disjoint key sets (FlashInfer's ``merge_state``).

    ``o_*`` ``[..., dv]`` float32, ``lse_*`` ``[...]`` float32 natural-log log-sum-exp (``-inf`` = no keys).
    Returns ``(o [..., dv], lse [...])``.
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    s = wa + wb
    o = (o_a * wa[..., None] + o_b * wb[..., None]) / s.clamp_min(1e-30)[..., None]
    return o, torch.where(s > 0, m + torch.log(s.clamp_min(1e-30)), torch.full_like(s, float("-inf")))


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                    visible: torch.Tensor | None = None, cap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of one request's queries, float32 (GQA: query head ``h`` reads kv head ``h // (Hq / Hkv)``).

    Parameters
    ----------
    q : ``[..., n, Hq, d]``; k : ``[..., Hkv, m, d]``; v : ``[..., Hkv, m, dv]`` (``...``: optional batch dims,
        one request each).
    visible : ``[..., n, m]`` bool — key ``j`` is visible to query ``i`` (None: every key).
    cap : ``> 0`` soft-caps the scaled logits, ``cap * tanh(s / cap)``, before masking.

    Returns
    -------
    ``(o [..., n, Hq, dv], lse [..., n, Hq])`` float32 (:func:`attention_state`; zeros / ``-inf`` where nothing is
    visible).
    """
    hq, hkv = q.shape[-2], k.shape[-3]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    g = hq // hkv
    qf = q.float().transpose(-3, -2)                                          # [..., Hq, n, d]
    kf = k.float().repeat_interleave(g, -3)                                   # [..., Hq, m, d]
    vf = v.float().repeat_interleave(g, -3)
    sc = (qf @ kf.transpose(-1, -2)) * scale                                  # [..., Hq, n, m]
    if cap > 0:
        sc = cap * torch.tanh(sc / cap)
    if visible is not None:
        sc = sc.masked_fill(~visible.to(sc.device).unsqueeze(-3), float("-inf"))
    o, lse = attention_state(sc, vf)                                          # [..., Hq, n, dv], [..., Hq, n]
    return o.transpose(-3, -2).contiguous(), lse.transpose(-2, -1).contiguous()


def causal_tail_hidden(t: int, m: int, g: int, device=None) -> torch.Tensor:
    """``[G*M, T]`` bool: the tail keys hidden from each query row, the ``M`` queries being the last ``M`` of a
    ``T``-token dense tail (row ``r`` is query ``r % M`` of its group; it sees tail positions ``<= T - M + r % M``)."""
    qpos = (t - m + torch.arange(m, device=device)).repeat(g)                 # query row → tail position
    return torch.arange(t, device=device)[None, :] > qpos[:, None]


def attention_from_codes(
    q: torch.Tensor,
    kcode: KeyCode | None,
    vcode: ValueCode | None,
    kcodec: AngleKeyCodec,
    vquant: GroupValueQuantizer,
    *,
    dense_k: torch.Tensor | None = None,
    dense_v: torch.Tensor | None = None,
    sm_scale: float | None = None,
    causal: bool = True,
    return_key_mass: bool = False,
):
    """Attention of ``q`` over a coded prefix followed by an optional dense tail.

    Parameters
    ----------
    q : ``[B, Hq, M, d]`` float — queries; head ``h`` reads kv head ``h // (Hq / Hkv)`` (GQA).
    kcode, vcode : coded prefix with leading dims ``[B, Hkv]`` and ``N`` tokens (or None for N = 0).
    dense_k, dense_v : ``[B, Hkv, T, d]`` — uncoded tokens after the prefix (recent window, new tokens).
    causal : the ``M`` queries are the last ``M`` tokens of the dense tail; each sees the prefix and
        the tail up to itself. With ``False`` every query sees everything.
    return_key_mass : also return ``[B, Hkv, N + T]`` float32, the attention probability each key
        received summed over the group's query heads and the ``M`` queries (RDR's utility signal).

    Returns
    -------
    ``[B, Hq, M, d]`` float32 (and the key mass when asked).
    """
    b, hq, m, d = q.shape
    hkv = kcode.codes.shape[1] if kcode is not None else dense_k.shape[1]
    g = hq // hkv
    scale = sm_scale if sm_scale is not None else d ** -0.5
    qg = q.to(torch.float32).reshape(b, hkv, g * m, d)                       # [B, Hkv, G*M, d]
    parts, values = [], []
    if kcode is not None and kcode.num_tokens > 0:
        parts.append(logits_from_codes(qg, kcode, kcodec) * scale)          # [B, Hkv, G*M, N]
        values.append(("coded", vquant.decode_storage(vcode)))
    if dense_k is not None and dense_k.shape[-2] > 0:
        t = dense_k.shape[-2]
        s = (qg @ dense_k.to(torch.float32).transpose(-1, -2)) * scale       # [B, Hkv, G*M, T]
        if causal:
            s = s.masked_fill(causal_tail_hidden(t, m, g, q.device), float("-inf"))
        parts.append(s)
        values.append(("dense", dense_v.to(torch.float32)))
    p = torch.softmax(torch.cat(parts, -1), -1)                              # [B, Hkv, G*M, N+T]
    out, start = 0.0, 0
    for kind, v in values:
        n = v.shape[-2]
        o = p[..., start:start + n] @ v
        out = out + (vquant.from_storage_domain(o) if kind == "coded" else o)
        start += n
    out = out.reshape(b, hq, m, d)
    if return_key_mass:
        return out, p.sum(-2)
    return out
