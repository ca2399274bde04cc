# SPDX-License-Identifier: Apache-2.0
"""Reference attention over angle-coded keys and quantized values (pure PyTorch, any device)."""
from __future__ import annotations

import torch

from .keys import AngleKeyCodec, KeyCode
from .logits import logits_from_codes
from .values import GroupValueQuantizer, ValueCode

__all__ = ["attention_from_codes"]


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
            qpos = (t - m + torch.arange(m, device=q.device)).repeat(g)     # query row → tail position
            s = s.masked_fill(torch.arange(t, device=q.device)[None, :] > qpos[:, None], float("-inf"))
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
