# SPDX-License-Identifier: Apache-2.0
"""Attention of an extend batch's new tokens among themselves, all requests at once.

The new tokens of a forward batch are ragged: request ``b`` owns rows ``[s_b, s_b + n_b)`` of
``q`` / ``k`` / ``v`` (``s`` = running sum of ``n``). :func:`ragged_attention` packs them into a
right-padded batch ``[B, H, n_max, d]`` and runs one attention call over it, returning the
``(o, lse)`` state that the backend merges with the cached prefix's state. Right padding is exact
for causal attention (a valid query ``i < n_b`` sees keys ``<= i``, never a padded one); for
bidirectional attention the padded keys are masked. Requests are packed in groups of similar
length so that padding never more than doubles the work (``_GROUP_WASTE``): one call for a typical
batch.

Two implementations, one answer:

* CPU without soft-capping: ATen's flash-attention kernel for CPU
  (``aten._scaled_dot_product_flash_attention_for_cpu``), float32 accumulation and float32
  log-sum-exp; in the model dtype (what SGLang's ``torch_native`` backend, SDPA, runs) when the output is
  final, in float32 (``compute_dtype``) when it is merged with a cached prefix's state;
* otherwise (soft-capping, CUDA): :func:`sphkv.attention.dense_attention` (float32) over the padded batch.

:func:`ragged_attention_reference` is the former per-request loop over ``dense_attention``; the seam
test ``tests/test_sglang_units.py`` compares the two on random ragged batches.
"""
from __future__ import annotations

import torch

from sphkv.attention import dense_attention

__all__ = ["ragged_attention", "ragged_attention_reference"]

_GROUP_WASTE = 2.0      # a group's padded work (count * n_max^2) may be at most this times its real work


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q / k / v must be [tokens, heads, dim]; got {tuple(q.shape)} / {tuple(k.shape)} / "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}")
    if any(n < 0 for n in q_lens) or sum(q_lens) != q.shape[0] or k.shape[0] != q.shape[0] != v.shape[0]:
        raise ValueError(f"q_lens {list(q_lens)} (sum {sum(q_lens)}) must be >= 0 and cover the {q.shape[0]} rows "
                         f"of q (k: {k.shape[0]}, v: {v.shape[0]})")


def _groups(q_lens: list[int]) -> list[list[int]]:
    """Requests (indices, non-empty only) in groups of similar length, longest first: a group's padded work
    ``len(group) * n_max^2`` stays within ``_GROUP_WASTE`` times its ``sum(n^2)``."""
    order = sorted((i for i, n in enumerate(q_lens) if n > 0), key=lambda i: -q_lens[i])
    groups: list[list[int]] = []
    work = 0
    for i in order:
        n = q_lens[i]
        if groups:
            top = q_lens[groups[-1][0]]
            if (len(groups[-1]) + 1) * top * top <= _GROUP_WASTE * (work + n * n):
                groups[-1].append(i)
                work += n * n
                continue
        groups.append([i])
        work = n * n
    return groups


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens, *, scale: float,
                     causal: bool = True, cap: float = 0.0,
                     compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every request's new tokens to its own new tokens, the whole batch in one call per group.

    Parameters
    ----------
    q : ``[T, Hq, d]``; k : ``[T, Hkv, d]``; v : ``[T, Hkv, dv]`` (any float dtype; ``Hq % Hkv == 0``, GQA:
        query head ``h`` reads kv head ``h // (Hq / Hkv)``).
    q_lens : new tokens per request (host ints, ``sum == T``; zeros allowed); request ``b``'s rows follow
        request ``b - 1``'s.
    causal : query ``i`` of a request sees its keys ``<= i`` (else all of its request's keys).
    cap : ``> 0`` soft-caps the scaled logits, ``cap * tanh(s / cap)``.
    compute_dtype : the flash kernel's input dtype (None: ``q``'s). ``torch.float32`` when the state is merged
        with another one (a cached prefix): the model dtype would round the partial output before the merge.

    Returns
    -------
    ``(o [T, Hq, dv], lse [T, Hq])`` float32 — the state :func:`sphkv.attention.merge_state` takes.
    """
    q_lens = [int(n) for n in q_lens]
    _check(q, k, v, q_lens)
    T, hq, dv = q.shape[0], q.shape[1], v.shape[2]
    o = torch.empty(T, hq, dv, dtype=torch.float32, device=q.device)
    lse = torch.empty(T, hq, dtype=torch.float32, device=q.device)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    flash = q.device.type == "cpu" and cap == 0
    for group in _groups(q_lens):
        lens = torch.tensor([q_lens[i] for i in group], device=q.device)
        n_max = q_lens[group[0]]
        pos = torch.arange(n_max, device=q.device)
        valid = pos[None, :] < lens[:, None]                                         # [B, n_max]
        rows = torch.tensor([starts[i] for i in group], device=q.device)[:, None] + pos[None, :]
        rows = torch.where(valid, rows, torch.zeros_like(rows))                      # padded rows read row 0
        qp, kp, vp = (x[rows].transpose(1, 2) for x in (q, k, v))                    # [B, H, n_max, d]
        if flash and compute_dtype is not None:
            qp, kp, vp = qp.to(compute_dtype), kp.to(compute_dtype), vp.to(compute_dtype)
        if flash:
            og, lg = _flash_cpu(qp, kp, vp, valid, scale=scale, causal=causal)
        else:
            og, lg = _math(qp, kp, vp, valid, scale=scale, causal=causal, cap=cap)
        sel = rows[valid]                                                            # [sum n] original rows
        o[sel] = og.transpose(1, 2)[valid].float()
        lse[sel] = lg.transpose(1, 2)[valid].float()
    return o, lse


def _flash_cpu(qp, kp, vp, valid, *, scale, causal):
    g = qp.shape[1] // kp.shape[1]
    if g > 1:
        kp, vp = kp.repeat_interleave(g, 1), vp.repeat_interleave(g, 1)
    mask = None
    if not causal:                                                                   # hide the padded keys
        mask = torch.zeros(valid.shape[0], 1, 1, valid.shape[1], dtype=qp.dtype, device=qp.device)
        mask.masked_fill_(~valid[:, None, None, :], float("-inf"))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qp, kp, vp, 0.0, causal, attn_mask=mask,
                                                                       scale=scale)


def _math(qp, kp, vp, valid, *, scale, causal, cap):
    """float32 reference math (:func:`sphkv.attention.dense_attention` over the padded batch): ``[B, H, n, d]``
    in, ``(o [B, Hq, n, dv], lse [B, Hq, n])`` out."""
    n = qp.shape[2]
    vis = valid[:, None, :].expand(-1, n, n)                                         # [B, n, n]: key j is real
    if causal:
        vis = vis & torch.ones(n, n, dtype=torch.bool, device=qp.device).tril()
    o, lse = dense_attention(qp.transpose(1, 2), kp, vp, scale=scale, visible=vis, cap=cap)   # [B, n, Hq, dv]
    return o.transpose(1, 2), lse.transpose(1, 2)


def ragged_attention_reference(q, k, v, q_lens, *, scale: float, causal: bool = True, cap: float = 0.0):
    """The per-request loop this module replaces: :func:`sphkv.attention.dense_attention` once per request,
    float32. Same arguments and returns as :func:`ragged_attention`."""
    q_lens = [int(n) for n in q_lens]
    _check(q, k, v, q_lens)
    o = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[0], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    s = 0
    for n in q_lens:
        if n:
            vis = torch.ones(n, n, dtype=torch.bool, device=q.device).tril() if causal else None
            o[s:s + n], lse[s:s + n] = dense_attention(q[s:s + n], k[s:s + n].transpose(0, 1),
                                                       v[s:s + n].transpose(0, 1), scale=scale, visible=vis, cap=cap)
        s += n
    return o, lse
