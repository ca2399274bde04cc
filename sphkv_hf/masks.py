# SPDX-License-Identifier: Apache-2.0
"""Which stored keys a query may attend to: transformers' masks applied to a segmented cache.

transformers builds a mask per layer type (causal, sliding window, chunked, padding, packed sequences)
over *cache positions* — column ``j`` of a ``[B, 1, M, KV]`` mask is the token at cache position
``kv_offset + j`` (the token's index in its row, pads included). A :class:`sphkv_hf.SphKVCache` layer
keeps a subset of the positions (a sliding layer only its window; RDR drops tokens per kv head), in
segments that know each slot's position. :class:`Visibility` turns the mask into a boolean per
``(query, stored slot)`` by gathering the mask's column of every slot's position.

When transformers passes no mask (its SDPA mask skips a pure causal one), :class:`Visibility` is
causal, and with ``window`` also applies the sliding window itself (key ``k`` visible to query ``q``
iff ``q - window < k <= q``, transformers' ``sliding_window_overlay``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Visibility", "bool_mask"]


def bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """A transformers 4-D mask ``[B, 1, M, KV]`` → bool (True = may attend).

    Boolean masks pass through; additive float masks (eager format) must hold only 0 and a large negative
    value: anything else is an attention bias the sphkv attention cannot apply (``NotImplementedError``).
    """
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise NotImplementedError(f"attention mask of dtype {mask.dtype} is not supported; allowed: bool, float")
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | blocked).all()):
        raise NotImplementedError("an additive attention bias (a float mask with values other than 0 and -inf) "
                                  "is not supported by the sphkv attention")
    return ~blocked


@dataclass(frozen=True)
class Visibility:
    """Visibility of stored keys to the ``M`` queries of one forward.

    Attributes
    ----------
    q_pos : ``[M]`` int64 — cache positions of the queries.
    mask : ``[B, 1, M, KV]`` bool from transformers (True = may attend), column ``j`` = position
        ``kv_offset + j``; when given it is the whole rule (causality included). None: causal, plus ``window``.
    kv_offset : cache position of the mask's first column.
    window : sliding window (used only when ``mask`` is None).
    """

    q_pos: torch.Tensor
    mask: torch.Tensor | None = None
    kv_offset: int = 0
    window: int | None = None

    def __post_init__(self) -> None:
        if self.mask is not None:
            if self.mask.dim() != 4 or self.mask.shape[1] != 1 or self.mask.shape[2] != self.q_pos.numel():
                raise NotImplementedError(
                    f"attention mask of shape {tuple(self.mask.shape)} is not supported; allowed: "
                    f"[batch, 1, {self.q_pos.numel()} queries, kv length] (one mask shared by all heads)")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window!r} must be >= 1")

    @classmethod
    def for_queries(cls, num_seen: int, num_queries: int, *, mask: torch.Tensor | None = None, kv_offset: int = 0,
                    window: int | None = None, device=None) -> "Visibility":
        """The ``num_queries`` queries are the last tokens of ``num_seen`` positions seen by a cache layer."""
        q_pos = torch.arange(num_seen - num_queries, num_seen, device=device)
        return cls(q_pos, None if mask is None else bool_mask(mask), kv_offset, window)

    @property
    def is_causal_only(self) -> bool:
        """True when nothing but causality applies (every stored key before the queries is visible)."""
        return self.mask is None and self.window is None

    def sees_all_before(self, end: int) -> bool:
        """True when every query may see every cache position ``< end`` (then slots of unknown position there
        need no mask: a prefix built without ``positions`` on a plain causal model)."""
        if end <= 0:
            return True
        if self.mask is None:
            return self.window is None or int(self.q_pos.max()) - self.window < 0
        if self.kv_offset > 0 or self.mask.shape[-1] < end:
            return False
        return bool(self.mask[..., :end].all())

    def allowed(self, key_pos: torch.Tensor) -> torch.Tensor:
        """``key_pos`` ``[B|1, H|1, N]`` int64 (``-1`` = padding slot) → ``[B|1, H|1, M, N]`` bool."""
        kp = key_pos[..., None, :]                                    # [B', H', 1, N]
        qp = self.q_pos.to(key_pos.device)[:, None]                   # [M, 1]
        if self.mask is None:
            ok = (kp >= 0) & (kp <= qp)
            if self.window is not None:
                ok = ok & (kp > qp - self.window)
            return ok
        b = max(self.mask.shape[0], kp.shape[0])
        h, m, n, kv = kp.shape[1], qp.shape[0], kp.shape[-1], self.mask.shape[-1]
        idx = kp - self.kv_offset
        inside = (kp >= 0) & (idx >= 0) & (idx < kv)                  # [B', H', 1, N]
        idx = idx.clamp(0, kv - 1).expand(b, h, m, n)
        got = torch.gather(self.mask.to(key_pos.device).expand(b, h, m, kv), -1, idx)
        return got & inside
