# SPDX-License-Identifier: Apache-2.0
"""Encode whole pages of keys/values into a coded tier's arena: Triton launcher and reference.

The launcher rotates keys (and values, when the tier rotates them) with one float32 GEMM, exactly as
the codec does; the kernel then centers, runs the polar transform, bucketizes and packs.

Tolerance against :class:`sphkv.AngleKeyCodec` / :class:`sphkv.GroupValueQuantizer` (the
reference, which this module's ``encode_pages_reference`` calls): the kernel sums the page mean in
its own order and bucketizes by sign tests instead of ``atan2``, so a page mean within rounding of a
bf16 tie may round to the neighbouring value, an angle within float rounding of a decision
threshold may land in the neighbouring bin, and a value within rounding of a ``.5`` step may round
the other way. Everything else is identical:

* codes differ by at most one step (cyclically for level 1) and in a small fraction of fields;
* radii agree to fp16 rounding, page means to one bf16 ulp, scales/zeros to one fp16 ulp;
* the decoded keys' relative error against the input equals the reference's to ~1e-3.
"""
from __future__ import annotations

import torch

from .layout import CodedLayout

__all__ = ["encode_pages", "encode_pages_reference"]


def _check(k, v, page_ids, page_lens, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, layout):
    p, d = layout.page_size, layout.head_dim
    assert k.dim() == 3 and k.shape == v.shape and k.shape[1] <= p and k.shape[2] == d, \
        f"k, v must be [W, <= {p}, {d}], got {tuple(k.shape)} / {tuple(v.shape)}"
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k.is_floating_point() and v.is_floating_point()
    w = k.shape[0]
    assert page_ids.dtype == torch.int32 and page_lens.dtype == torch.int32
    assert page_ids.shape == (w,) and page_lens.shape == (w,)
    n = k_codes.shape[0]
    assert k_codes.dtype == torch.uint8 and k_codes.shape == (n, p, layout.key_code_bytes) and k_codes.is_contiguous()
    assert k_radius.dtype == torch.float16 and k_radius.shape == (n, p) and k_radius.is_contiguous()
    assert k_mean.dtype == torch.bfloat16 and k_mean.shape == (n, d) and k_mean.is_contiguous()
    assert v_codes.dtype == torch.uint8 and v_codes.shape == (n, p, layout.value_code_bytes) and v_codes.is_contiguous()
    if layout.value_bits != 16:
        for t in (v_scale, v_zero):
            assert t.dtype == torch.float16 and t.shape == (n, p, layout.num_value_groups) and t.is_contiguous()
    return w


def encode_pages(k, v, page_ids, page_lens, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, *,
                 layout: CodedLayout, rows: int | None = None, num_warps: int | None = None) -> None:
    """Encode ``W`` pages in place (Triton): slots ``0..page_lens[i]-1`` of page ``page_ids[i]``.

    Parameters
    ----------
    k, v : ``[W, n_max, d]`` float (any float dtype, last dim contiguous), ``n_max <= page_size`` —
        keys (post-RoPE) and values of each page; rows ``>= page_lens[i]`` are ignored.
    page_ids : ``[W]`` int32 — destination pages in the tier arena; page_lens : ``[W]`` int32 in ``1..n_max``.
    k_codes, k_radius, k_mean, v_codes, v_scale, v_zero : the coded tier arena (see :mod:`sphkv.pool`).
    layout : :class:`~sphkv_kernels.layout.CodedLayout` of the arena's tier.

    Examples
    --------
    >>> import torch
    >>> from sphkv import SphKVConfig
    >>> from sphkv.pool import TierPool
    >>> from sphkv.tiers import Tier
    >>> pool = TierPool(Tier("t", SphKVConfig.from_name("sphkv-4", head_dim=64, page_size=16)), 3,
    ...                 head_dim=64, page_size=16)
    >>> k, v = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    >>> encode_pages_reference(k, v, torch.tensor([1, 2], dtype=torch.int32), torch.tensor([16, 9], dtype=torch.int32),
    ...                        *pool.tensors().values(), layout=CodedLayout.from_pool(pool))
    >>> bool(pool.k_radius[2, :9].gt(0).all()), bool(pool.k_radius[2, 9:].eq(0).all())
    (True, True)
    """
    from ._encode_kernels import _encode_kernel

    w = _check(k, v, page_ids, page_lens, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, layout)
    assert layout.kernel_compiles, "layout needs the reference encoder"
    if w == 0:
        return
    c = layout.on(k.device)
    d, p = layout.head_dim, layout.page_size
    k = torch.matmul(k.to(torch.float32), c["key_rotation_t"])                        # [W, n, d] rotated
    if layout.value_rotate:
        v = torch.matmul(v.to(torch.float32), c["value_rotation_t"])
    nwk = 1 << max(0, (-(-layout.key_code_bytes // 4) - 1).bit_length())
    nwv = 1 << max(0, (-(-layout.value_code_bytes // 4) - 1).bit_length())
    vbits = layout.value_bits
    _encode_kernel[(w,)](
        k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1), page_ids, page_lens,
        k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, c["thr"],
        HEAD_DIM=d, PAGE_SIZE=p, ROWS=rows or min(p, 16), NUM_LEVELS=layout.num_levels, **layout.key_constexprs(),
        KB=layout.key_code_bytes, NWK=nwk, VBITS=vbits, VGROUP=layout.value_group if vbits != 16 else d,
        VB=layout.value_code_bytes, NVG=max(layout.num_value_groups, 1), NWV=nwv,
        HAS_MEAN=layout.has_mean, num_warps=num_warps or 4)


def encode_pages_reference(k, v, page_ids, page_lens, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, *,
                           layout: CodedLayout, rows=None, num_warps=None) -> None:
    """Pure-PyTorch :func:`encode_pages` (exactly :meth:`sphkv.pool.TierPool.write` per page)."""
    w = _check(k, v, page_ids, page_lens, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, layout)
    lens = page_lens.tolist()
    pages = page_ids.tolist()
    for i in range(w):
        n, pg = lens[i], pages[i]
        kc = layout.kcodec.encode(k[i, :n])
        vc = layout.vquant.encode(v[i, :n])
        k_codes[pg, :n], k_radius[pg, :n] = kc.codes, kc.radius
        k_mean[pg] = kc.mean[0] if kc.mean is not None else 0
        v_codes[pg, :n] = vc.codes
        if layout.value_bits != 16:
            v_scale[pg, :n], v_zero[pg, :n] = vc.scale, vc.zero
