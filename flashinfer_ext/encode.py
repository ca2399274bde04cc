# SPDX-License-Identifier: Apache-2.0
"""Page encoder: whole pages of keys/values → a coded tier's arena, through the registered custom op."""
from __future__ import annotations

import torch

from sphkv.pool import TierPool
from sphkv.tiers import Tier
from sphkv.validation import NonFiniteError
from sphkv_kernels.layout import CodedLayout

from . import ops  # noqa: F401  (registers the custom ops)
from .decode import resolve_backend
from .ops import NAMESPACE, config_key

__all__ = ["SphKVPageEncoder"]


class SphKVPageEncoder:
    """Encode pages of one coded tier (what a KV pool calls when a dense page is compressed).

    Parameters
    ----------
    tier : the coded :class:`sphkv.tiers.Tier` of the destination arena.
    backend : ``"auto"`` | ``"triton"`` | ``"reference"`` (see
        :func:`flashinfer_ext.resolve_backend`).

    Examples
    --------
    >>> import torch
    >>> from sphkv import SphKVConfig
    >>> tier = Tier("sphkv-4", SphKVConfig.from_name("sphkv-4", head_dim=64, page_size=16))
    >>> pool = TierPool(tier, 4, head_dim=64, page_size=16)
    >>> enc = SphKVPageEncoder(tier)
    >>> enc.encode(torch.randn(2, 16, 64), torch.randn(2, 16, 64), torch.tensor([1, 3], dtype=torch.int32),
    ...            torch.tensor([16, 5], dtype=torch.int32), pool)
    >>> int((pool.k_radius[3] > 0).sum())
    5
    """

    def __init__(self, tier: Tier, *, backend: str = "auto"):
        if tier.dense:
            raise ValueError("a dense tier needs no encoder: copy bf16 keys and values into its pages")
        self.tier = tier
        self._key = config_key(tier.config)
        self._backend = backend
        resolve_backend(backend, torch.device("cpu"))

    def encode(self, k: torch.Tensor, v: torch.Tensor, page_ids: torch.Tensor, page_lens: torch.Tensor,
               pool: TierPool) -> None:
        """Write ``W`` pages.

        Parameters
        ----------
        k, v : ``[W, n_max, head_dim]`` float (``n_max <= page_size``, last dim contiguous) — post-RoPE keys, values.
        page_ids : ``[W]`` int32 — destination pages; page_lens : ``[W]`` int32 in ``1..n_max`` — tokens of each.
        pool : the tier's :class:`sphkv.pool.TierPool` (its tensors are written in place).
        """
        backend = resolve_backend(self._backend, k.device)
        if backend == "cpu":            # the C++ encoder has no NaN policy of its own: refuse instead of coding garbage
            for name, x in (("k", k), ("v", v)):
                if not bool(torch.isfinite(x).all()):
                    raise NonFiniteError(f"SphKVPageEncoder.encode: {name} contains NaN/Inf; the CPU encoder codes "
                                         f"finite pages only (zero or drop the bad tokens first, as the pool does)")
        if backend == "triton" and not CodedLayout.from_config(self.tier.config).kernel_compiles:
            backend = "reference"
        getattr(torch.ops, NAMESPACE).encode_pages(
            k, v, page_ids, page_lens, pool.k_codes, pool.k_radius, pool.k_mean, pool.v_codes, pool.v_scale,
            pool.v_zero, self._key, backend)
