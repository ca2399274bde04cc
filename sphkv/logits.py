# SPDX-License-Identifier: Apache-2.0
"""Attention logits straight from angle codes (no dense key is ever built).

For a rotated query ``q`` and level-1 centers ``θ_c`` the per-query table is
``T[i, c] = q[2i]·cos θ_c + q[2i+1]·sin θ_c``. A key's logit is the gather ``s_i = T[i, code_i]``
combined bottom-up with its higher-level angles, ``s = cos β·s_left + sin β·s_right``, times its
radius, plus ``q·μ`` of its page mean. Two equivalent evaluations:

* :func:`logits_lut` — the recurrence itself (decode: few queries per key group);
* :func:`logits_adc` — product-quantization-style asymmetric distance as a GEMM: the tables
  ``[M, d/2 · n1]`` times a one-hot code matrix weighted by each pair's radius (extend: many queries).
"""
from __future__ import annotations

import torch

from .keys import AngleKeyCodec, KeyCode

__all__ = ["query_tables", "logits_lut", "logits_adc", "logits_from_codes", "mean_logits"]


def query_tables(q_rot: torch.Tensor, codec: AngleKeyCodec) -> torch.Tensor:
    """``q_rot`` ``[..., M, d]`` float32 (rotated) → level-1 tables ``[..., M, d/2, n1]`` float32."""
    c = codec.centers[0].to(q_rot.device)
    return q_rot[..., 0::2, None] * torch.cos(c) + q_rot[..., 1::2, None] * torch.sin(c)


def mean_logits(q_rot: torch.Tensor, code: KeyCode, codec: AngleKeyCodec) -> torch.Tensor | float:
    """``q·μ`` per token ``[..., M, N]`` (0.0 without centering); one dot per page, expanded to tokens."""
    if code.mean is None:
        return 0.0
    per_page = q_rot @ code.mean.to(torch.float32).transpose(-1, -2)           # [..., M, pages]
    idx = torch.arange(code.num_tokens, device=q_rot.device) // codec.config.page_size
    return per_page.index_select(-1, idx)


def _higher_cos_sin(codec: AngleKeyCodec, levels: list[torch.Tensor]):
    out = []
    for l in range(1, len(levels)):
        c = codec.centers[l].to(levels[l].device)
        out.append((torch.cos(c)[levels[l]], torch.sin(c)[levels[l]]))            # [..., N, d/2^(l+1)]
    return out


def logits_lut(q: torch.Tensor, code: KeyCode, codec: AngleKeyCodec, *, rotated: bool = False) -> torch.Tensor:
    """Logits ``[..., M, N]`` float32 of queries ``q`` ``[..., M, d]`` against ``code`` (leading dims match).

    Gathers one table entry per level-1 pair and runs the bottom-up angular recurrence.
    """
    q_rot = q.to(torch.float32) if rotated else codec.rotate(q)
    levels = codec.unpack_levels(code.codes)                                   # [..., N, d/2], ...
    tables = query_tables(q_rot, codec)                                        # [..., M, d/2, n1]
    m, n = q_rot.shape[-2], code.num_tokens
    idx = levels[0].unsqueeze(-3).expand(*levels[0].shape[:-2], m, n, levels[0].shape[-1])
    s = torch.gather(tables.unsqueeze(-3).expand(*tables.shape[:-2], n, *tables.shape[-2:]),
                     -1, idx.unsqueeze(-1)).squeeze(-1)                        # [..., M, N, d/2]
    for cos_b, sin_b in _higher_cos_sin(codec, levels):
        s = cos_b.unsqueeze(-3) * s[..., 0::2] + sin_b.unsqueeze(-3) * s[..., 1::2]
    logits = s.squeeze(-1) * code.radius.to(torch.float32).unsqueeze(-2)
    return logits + mean_logits(q_rot, code, codec)


def pair_radii(code: KeyCode, codec: AngleKeyCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """(level-1 codes ``[..., N, d/2]``, level-1 pair radii ``[..., N, d/2]`` float32) from the higher levels."""
    levels = codec.unpack_levels(code.codes)
    rho = code.radius.to(torch.float32)[..., None]
    for cos_b, sin_b in reversed(_higher_cos_sin(codec, levels)):
        rho = torch.stack([rho * cos_b, rho * sin_b], -1).flatten(-2)
    return levels[0], rho


def logits_adc(q: torch.Tensor, code: KeyCode, codec: AngleKeyCodec, *, rotated: bool = False,
               block: int = 1024) -> torch.Tensor:
    """Same result as :func:`logits_lut`, as ``tables @ onehot(codes)·ρ`` GEMMs over key blocks of ``block``."""
    q_rot = q.to(torch.float32) if rotated else codec.rotate(q)
    tables = query_tables(q_rot, codec).flatten(-2)                            # [..., M, d/2 * n1]
    c1, rho = pair_radii(code, codec)
    n1 = codec.centers[0].numel()
    out = []
    for s in range(0, code.num_tokens, block):
        c, r = c1[..., s:s + block, :], rho[..., s:s + block, :]
        w = torch.zeros(*c.shape, n1, device=q_rot.device, dtype=torch.float32)
        w.scatter_(-1, c.unsqueeze(-1), r.unsqueeze(-1))                       # [..., b, d/2, n1]
        out.append(tables @ w.flatten(-2).transpose(-1, -2))                   # [..., M, b]
    return torch.cat(out, -1) + mean_logits(q_rot, code, codec)


def logits_from_codes(q: torch.Tensor, code: KeyCode, codec: AngleKeyCodec, *, rotated: bool = False) -> torch.Tensor:
    """Pick the cheaper evaluation: the recurrence for a few queries, ADC GEMMs for many."""
    fn = logits_lut if q.shape[-2] * codec.centers[0].numel() <= 64 else logits_adc
    return fn(q, code, codec, rotated=rotated)
