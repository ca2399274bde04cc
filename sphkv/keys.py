# SPDX-License-Identifier: Apache-2.0
"""ADA key codec: rotation → page-mean centering → recursive polar transform → packed angle codes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .codebooks import level_codebook, thresholds
from .config import SphKVConfig
from .packing import pack_bits, packed_bytes, unpack_bits
from .polar import level_sizes, polar_forward, polar_inverse
from .rotation import rotation_matrix
from .validation import check_finite

__all__ = ["KeyCode", "AngleKeyCodec"]


@dataclass(frozen=True)
class KeyCode:
    """Angle-coded keys of one block of tokens that starts on a page boundary.

    Attributes
    ----------
    codes : ``[..., N, code_bytes]`` uint8 — all angle codes of a token, level 1 first (see packing.py).
    radius : ``[..., N]`` float16 — norm of the rotated, centered key.
    mean : ``[..., ceil(N / page_size), head_dim]`` bfloat16 page means in the rotated domain, or None.
    """

    codes: torch.Tensor
    radius: torch.Tensor
    mean: torch.Tensor | None

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[-2]


class AngleKeyCodec:
    """Encode keys ``[..., N, d]`` to a :class:`KeyCode` and back.

    ``codebooks`` optionally overrides the per-level centers (e.g. fitted with
    :func:`sphkv.codebooks.fit_codebook`); by default they follow ``config.codebook``.

    Examples
    --------
    >>> codec = AngleKeyCodec(SphKVConfig.from_name("sphkv-4"))
    >>> k = torch.randn(2, 100, 64)
    >>> code = codec.encode(k)
    >>> code.codes.shape, code.radius.shape, code.mean.shape
    (torch.Size([2, 100, 28]), torch.Size([2, 100]), torch.Size([2, 2, 64]))
    >>> float(((codec.decode(code) - k).norm() / k.norm()) ** 2) < 0.05
    True
    """

    def __init__(self, config: SphKVConfig, *, codebooks: list[torch.Tensor] | None = None):
        self.config = config
        d = config.head_dim
        self.sizes = level_sizes(d)
        if codebooks is None:
            codebooks = [level_codebook(l + 1, b, config.codebook) for l, b in enumerate(config.level_bits)]
        if len(codebooks) != len(self.sizes):
            raise ValueError(f"codebooks has {len(codebooks)} levels; head_dim={d} needs {len(self.sizes)}")
        for l, (cb, b) in enumerate(zip(codebooks, config.level_bits)):
            if cb.numel() != 1 << b:
                raise ValueError(f"codebooks[{l}] has {cb.numel()} centers; level_bits[{l}]={b} needs {1 << b}")
        self.centers = [cb.to(torch.float64).sort().values.to(torch.float32) for cb in codebooks]
        self._thresholds = [thresholds(c) for c in self.centers]
        self.widths = torch.cat([torch.full((n,), b, dtype=torch.int64)
                                 for n, b in zip(self.sizes, config.level_bits)])
        self.code_bytes = packed_bytes(self.widths)
        self.rotation = rotation_matrix(d, config.rotation_seed)

    # -- accounting --------------------------------------------------------------------------------
    def stored_bytes(self, num_tokens: int) -> int:
        """Exact bytes for ``num_tokens`` keys of one head: codes + fp16 radius + bf16 page means."""
        cfg = self.config
        pages = -(-num_tokens // cfg.page_size) if cfg.center == "page" else 0
        return num_tokens * (self.code_bytes + 2) + pages * cfg.head_dim * 2

    # -- encode / decode ---------------------------------------------------------------------------
    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` → rotated ``[..., d]`` float32 (apply to queries before using tables)."""
        return x.to(torch.float32) @ self.rotation.to(x.device).T

    def page_means(self, y: torch.Tensor) -> torch.Tensor:
        """Per-page means of rotated keys ``y`` ``[..., N, d]`` → ``[..., ceil(N/P), d]`` float32."""
        n, p = y.shape[-2], self.config.page_size
        pages = -(-n // p)
        pad = pages * p - n
        yp = torch.nn.functional.pad(y, (0, 0, 0, pad)).unflatten(-2, (pages, p))
        counts = torch.full((pages,), float(p), device=y.device)
        counts[-1] = p - pad
        return yp.sum(-2) / counts[:, None]

    def expand_means(self, mean: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Page means ``[..., pages, d]`` → per-token ``[..., N, d]`` (float32)."""
        idx = torch.arange(num_tokens, device=mean.device) // self.config.page_size
        return mean.to(torch.float32).index_select(-2, idx)

    def encode(self, k: torch.Tensor, *, name: str = "keys") -> KeyCode:
        """``k`` ``[..., N, d]`` (any float dtype, N ≥ 1) → :class:`KeyCode`. NaN/Inf follow ``config.nonfinite``."""
        if k.shape[-1] != self.config.head_dim or k.dim() < 2 or k.shape[-2] == 0:
            raise ValueError(f"{name} must be [..., N>=1, {self.config.head_dim}], got {tuple(k.shape)}")
        k, _ = check_finite(k.to(torch.float32), name, self.config.nonfinite)
        y = self.rotate(k)                                              # [..., N, d]
        mean = None
        if self.config.center == "page":
            mean = self.page_means(y).to(torch.bfloat16)
            y = y - self.expand_means(mean, y.shape[-2])
        radius, angles = polar_forward(y)
        fields = [torch.bucketize(a.contiguous(), t.to(a.device)) for a, t in zip(angles, self._thresholds)]
        codes = pack_bits(torch.cat(fields, -1), self.widths)           # [..., N, code_bytes]
        return KeyCode(codes=codes, radius=radius.to(torch.float16), mean=mean)

    def unpack_levels(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """``[..., N, code_bytes]`` uint8 → per-level code indices ``[[..., N, d/2], [..., N, d/4], ...]``."""
        return list(unpack_bits(codes, self.widths).split(self.sizes, -1))

    def level_angles(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Dequantized angles per level (float32)."""
        return [self.centers[l].to(codes.device)[c] for l, c in enumerate(self.unpack_levels(codes))]

    def decode_rotated(self, code: KeyCode) -> torch.Tensor:
        """Keys in the rotated domain ``[..., N, d]`` float32 (means added back). For tests and baselines."""
        y = polar_inverse(code.radius.to(torch.float32), self.level_angles(code.codes))
        if code.mean is not None:
            y = y + self.expand_means(code.mean, y.shape[-2])
        return y

    def decode(self, code: KeyCode) -> torch.Tensor:
        """Keys ``[..., N, d]`` float32 in the original domain. Never used in the logit path."""
        return self.decode_rotated(code) @ self.rotation.to(code.codes.device)
