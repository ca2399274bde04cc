# SPDX-License-Identifier: Apache-2.0
"""Paged decode attention over tier-homogeneous pages: launchers and pure-PyTorch references.

One launch per tier present in the batch (coded tiers: logits from angle codes, values dequantized
in registers; the dense tier: bf16 pages), each writing split-K partial softmax states to slots of
a :class:`~sphkv_kernels.schedule.DecodeSchedule`; then one merge launch combines the slots of
every (request, kv head) exactly and undoes each coded tier's value rotation once. Every launcher
``f`` has a reference ``f_reference`` with the identical signature and layout (built on
:mod:`sphkv.logits` and :mod:`sphkv.values`), used on CPU and by the tests.

Shapes (``B`` requests, ``Hq``/``Hkv`` query/kv heads, ``G = Hq / Hkv``, ``d`` head_dim,
``P`` page size, ``S`` slots, ``n`` entries of the tier):

* ``q`` ``[B, Hq, d]`` — for coded tiers the query rotated by the tier's key rotation (float32),
  for the dense tier the query itself (bf16/fp16/fp32); last dim contiguous;
* ``part_o`` ``[S, G, d]`` float32 and ``part_lse`` ``[S, G]`` float32 (log2 domain);
* ``logits`` (optional) ``[n * P, G]`` float32: the scaled log2-domain logit of every valid token
  of every entry (row-major over the tier's entries) — the input of the key-mass epilogue.
"""
from __future__ import annotations

import logging
import math
import os

import torch

from sphkv.keys import KeyCode
from sphkv.logits import logits_lut
from sphkv.values import ValueCode

from .layout import CodedLayout

__all__ = ["coded_decode_partial", "coded_decode_partial_reference", "expand_extend_items",
           "coded_row_tables", "coded_row_tables_reference",
           "rowwise_row_table_elems", "dense_decode_partial",
           "dense_decode_partial_reference", "merge_partials", "merge_partials_reference",
           "interpreting", "LOG2E"]

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """Whether Triton runs under its CPU interpreter (``TRITON_INTERPRET=1`` before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _g_pad(group: int) -> int:
    return max(16, 1 << (group - 1).bit_length())


def _check_ext(ext, work, block_m, group: int, logits) -> int:
    """Rows per program: ``_g_pad(group)`` for decode items, ``block_m`` (default 64) for extend items ``ext``."""
    if ext is None:
        if block_m is not None:
            raise ValueError(f"block_m={block_m} applies to extend items (ext) only")
        return _g_pad(group)
    block_m = 64 if block_m is None else int(block_m)
    if block_m < 16 or block_m & (block_m - 1) or block_m < group:
        raise ValueError(f"block_m={block_m} must be a power of two >= 16 and >= the GQA group {group}")
    if logits is not None:
        raise ValueError("logits (key mass) are a decode output; extend items (ext) do not write them")
    assert ext.dtype == torch.int32 and ext.is_contiguous() and ext.shape == (work.shape[0], 3), \
        f"ext must be [{work.shape[0]}, 3] int32, got {tuple(ext.shape)} {ext.dtype}"
    assert ext.device == work.device, "ext must be on the work list's device"
    return block_m


def expand_extend_items(work: torch.Tensor, ext: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Extend items as per-token decode items: ``[sum(ext[:, 1]), 4]`` int32 ``(tok * num_kv_heads + kv_head, start,
    end, slot + k * slot_stride)`` for token ``tok = ext[w, 0] + k`` — the rows index ``q`` ``[num_q, Hq, d]`` the
    way a decode batch of ``num_q`` requests does (the references, and tiers the tensor-core kernel cannot read).

    >>> work, ext = torch.tensor([[3, 0, 2, 10]], dtype=torch.int32), torch.tensor([[4, 2, 5]], dtype=torch.int32)
    >>> expand_extend_items(work, ext, 2).tolist()
    [[9, 0, 2, 10], [11, 0, 2, 15]]
    """
    w, e = work.to(torch.int64), ext.to(torch.int64)
    n = e[:, 1].clamp_min(0)
    wid = torch.repeat_interleave(torch.arange(w.shape[0], device=w.device), n)
    k = torch.arange(wid.numel(), device=w.device) - (torch.cumsum(n, 0) - n)[wid]
    tok = e[wid, 0] + k
    rows = tok * num_kv_heads + w[wid, 0] % num_kv_heads
    out = torch.stack([rows, w[wid, 1], w[wid, 2], w[wid, 3] + k * e[wid, 2]], 1)
    return out.to(torch.int32).contiguous()


def _check_common(q, work, page_ids, page_lens, part_o, part_lse, logits, num_kv_heads, page_size):
    assert q.dim() == 3 and q.stride(-1) == 1, f"q must be [B, Hq, d] with a contiguous last dim, got {tuple(q.shape)}"
    b, hq, d = q.shape
    assert hq % num_kv_heads == 0, f"num_qo_heads={hq} is not a multiple of num_kv_heads={num_kv_heads}"
    g = hq // num_kv_heads
    assert work.dtype == torch.int32 and work.dim() == 2 and work.shape[1] == 4 and work.is_contiguous()
    assert page_ids.dtype == torch.int32 and page_lens.dtype == torch.int32
    assert page_ids.shape == page_lens.shape and page_ids.is_contiguous() and page_lens.is_contiguous()
    assert part_o.dtype == torch.float32 and part_o.is_contiguous() and part_o.shape[1:] == (g, d), \
        f"part_o must be [S, {g}, {d}] float32, got {tuple(part_o.shape)} {part_o.dtype}"
    assert part_lse.dtype == torch.float32 and part_lse.is_contiguous() and part_lse.shape == part_o.shape[:2]
    if logits is not None:
        assert logits.dtype == torch.float32 and logits.is_contiguous()
        assert logits.shape == (page_ids.numel() * page_size, g), \
            f"logits must be [{page_ids.numel() * page_size}, {g}], got {tuple(logits.shape)}"
    for t in (work, page_ids, page_lens, part_o, part_lse):
        assert t.device == q.device, "all tensors must be on q's device"
    return b, hq, d, g


# -------------------------------------------------------------------------------------------------
# coded tier
# -------------------------------------------------------------------------------------------------
def rowwise_supported(layout: CodedLayout, group: int) -> bool:
    """Whether the row-wise kernel (:mod:`sphkv_kernels._coded_rowwise_kernels`) handles this tier.

    It needs 32-bit aligned key codes (``key_code_bytes % 4 == 0``), a level-1 table that stays small
    (``level_bits[0] <= 5``), byte-aligned value fields (2, 4 or 8 bits) with at least 16 bytes per
    value group (the tensor-core dots' minimum width) and ``group <= 16``."""
    return (layout.key_code_bytes % 4 == 0 and layout.level_bits[0] <= 5 and layout.value_bits in (2, 4, 8)
            and layout.value_group * layout.value_bits // 8 >= 16 and group <= 16 and layout.page_size >= 16
            and layout.head_dim >= 32)


def tc_supported(layout: CodedLayout, group: int) -> bool:
    """Whether the tensor-core kernel (:mod:`sphkv_kernels._coded_tc_kernels`) handles this tier: 32-bit aligned
    key codes, a power-of-two ``head_dim >= 32``, byte-aligned value fields (2, 4 or 8 bits) with at least 16
    bytes per value group, ``group <= 16`` and ``page_size >= 16``."""
    d = layout.head_dim
    return (layout.key_code_bytes % 4 == 0 and d >= 32 and d & (d - 1) == 0 and layout.value_bits in (2, 4, 8)
            and layout.value_group * layout.value_bits // 8 >= 16 and group <= 16 and layout.page_size >= 16)


# which coded kernel ``kernel="auto"`` runs where it is supported: "rowwise" (default: measured fastest on the
# H200, 307 µs vs 357 µs for "tc" at 8 x 32K, NOTES.md) or "tc" (the tensor-core kernel, opt-in)
DEFAULT_CODED_KERNEL = os.environ.get("SPHKV_CODED_KERNEL", "rowwise")
# from this head_dim up the wrappers run the tensor-core kernel where it covers the layout (on CUDA): H200 run 12,
# 8 x 32K 32/8/256 in a CUDA graph, tc 938.3 us vs row-wise 1,131.8 us (the row-wise kernel at d = 256: 255 registers
# plus a 1,328 B stack); at d = 128 / 64 and GQA 8 the row-wise kernel stays faster (run 12: 180.4 vs 218.9 us at
# 32/8/64, 452.8 vs 525.2 us at 64/8/128; run 2: 307 vs 357 us at 32/8/128)
TC_MIN_HEAD_DIM = int(os.environ.get("SPHKV_TC_MIN_HEAD_DIM", "256"))


def prefers_tc(layout: CodedLayout, group: int) -> bool:
    """Whether ``kernel="auto"`` on a GPU should be the tensor-core kernel for this tier (:data:`TC_MIN_HEAD_DIM`,
    :func:`tc_supported`); the wrappers resolve it per tier at plan time (no row-wise level-1 tables for it)."""
    return tc_supported(layout, group) and (DEFAULT_CODED_KERNEL == "tc" or layout.head_dim >= TC_MIN_HEAD_DIM)
_WARNED: set = set()


def _warn_once(key, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logging.getLogger("sphkv_kernels").warning(msg)


def rowwise_scratch_elems(layout: CodedLayout, group: int, num_items: int) -> int:
    """float32 elements of the per-work-item level-1 table scratch of the row-wise kernel."""
    return num_items * (layout.head_dim // 2) * (1 << layout.level_bits[0]) * _pow2(group)


def rowwise_row_table_elems(layout: CodedLayout, group: int, num_rows: int) -> int:
    """float32 elements of the per-row level-1 tables (:func:`coded_row_tables`) of ``num_rows`` rows."""
    return rowwise_scratch_elems(layout, group, num_rows)


def default_tab16() -> bool:
    """Whether the row-wise kernel's level-1 tables are float16 by default: on GPU (float16 dots) yes, under the
    interpreter no (float32 throughout, for exact comparisons; ``SPHKV_FORCE_F16=1`` forces float16)."""
    return (not interpreting()) or os.environ.get("SPHKV_FORCE_F16") == "1"


def _check_row_tables(q, q_rot, tables, layout, num_kv_heads):
    assert q.dim() == 3 and q.stride(-1) == 1, f"q must be [B, Hq, d] with a contiguous last dim, got {tuple(q.shape)}"
    b, hq, d = q.shape
    if hq % num_kv_heads:
        raise ValueError(f"num_qo_heads={hq} is not a multiple of num_kv_heads={num_kv_heads}")
    if d != layout.head_dim:
        raise ValueError(f"q has head_dim {d}; the layout {layout.head_dim}")
    assert q_rot.shape == q.shape and q_rot.dtype == torch.float32 and q_rot.stride(-1) == 1, \
        f"q_rot must be [{b}, {hq}, {d}] float32, got {tuple(q_rot.shape)} {q_rot.dtype}"
    g = hq // num_kv_heads
    need = rowwise_row_table_elems(layout, g, b * num_kv_heads)
    assert tables.dtype == torch.float32 and tables.is_contiguous() and tables.numel() >= need, \
        f"tables must be a contiguous float32 buffer of >= {need} elements, got {tables.numel()} {tables.dtype}"
    for t in (q_rot, tables):
        assert t.device == q.device, "all tensors must be on q's device"
    return b, hq, d, g


def coded_row_tables(q, q_rot, tables, *, layout: CodedLayout, num_kv_heads: int, sm_scale: float,
                     tab16: bool | None = None) -> None:
    """Rotated queries and the row-wise kernel's level-1 table of every row, once per decode step (Triton).

    Programs ``(row, block of 16 coordinate pairs)``, ``row = request * num_kv_heads + kv_head``: ``q_rot[b, h] =
    q[b, h] @ R.T`` (``R`` =
    ``layout.key_rotation``; float32 FMAs) and
    ``T_r[i, c, g] = qk_scale (q_rot[g, 2i] cos θ_c + q_rot[g, 2i+1] sin θ_c)`` (``qk_scale = sm_scale · log2 e``,
    ``θ_c`` the level-1 angle of code ``c``, ``g < GP`` the row's query heads padded to a power of two, rows
    ``g >= G`` zero) stored as ``[num_rows, d / 2, 2**level_bits[0], GP]`` at the start of ``tables`` (float16
    when ``tab16``, default :func:`default_tab16`, else float32). :func:`coded_decode_partial` with
    ``row_tables=True`` reads them: every work item of a row shares its table instead of building its own.

    Parameters
    ----------
    q : ``[B, Hq, d]`` (bf16/fp16/fp32, last dim contiguous) — the queries.
    q_rot : ``[B, Hq, d]`` float32 — receives the rotated queries.
    tables : float32 buffer of at least :func:`rowwise_row_table_elems` elements (reinterpreted as float16
        when ``tab16``).
    """
    from ._coded_rowwise_kernels import _row_tables_kernel

    b, hq, d, g = _check_row_tables(q, q_rot, tables, layout, num_kv_heads)
    if b == 0:
        return
    if layout.level_bits[0] > 5:
        raise ValueError(f"level_bits[0]={layout.level_bits[0]}: the row tables cover level-1 widths <= 5 bits")
    tab16 = default_tab16() if tab16 is None else bool(tab16)
    consts = layout.on(q.device)
    ib = min(16, d // 2)
    _row_tables_kernel[(b * num_kv_heads, d // 2 // ib)](
        q, q.stride(0), q.stride(1), consts["key_rotation_t"], q_rot, q_rot.stride(0), q_rot.stride(1),
        consts["lut"], tables, num_kv_heads, float(sm_scale) * LOG2E,
        HEAD_DIM=d, GROUP=g, GP=_pow2(g), LB1=layout.level_bits[0], LT1=layout.lut_offsets[0],
        TAB16=tab16, IB=ib, num_warps=4)


def coded_row_tables_reference(q, q_rot, tables, *, layout: CodedLayout, num_kv_heads: int, sm_scale: float,
                               tab16: bool | None = None) -> None:
    """Pure-PyTorch :func:`coded_row_tables` (same outputs, same table format)."""
    b, hq, d, g = _check_row_tables(q, q_rot, tables, layout, num_kv_heads)
    tab16 = default_tab16() if tab16 is None else bool(tab16)
    consts = layout.on(q.device)
    q_rot.copy_(q.to(torch.float32) @ consts["key_rotation_t"])
    gp, c1 = _pow2(g), 1 << layout.level_bits[0]
    qr = q_rot.view(b * num_kv_heads, g, d // 2, 2)
    cs = consts["lut"][layout.lut_offsets[0]:layout.lut_offsets[0] + c1]                     # [C1, 2]
    t = torch.einsum("rgij,cj->ricg", qr, cs) * (sm_scale * LOG2E)                            # [rows, N1, C1, G]
    t = torch.nn.functional.pad(t, (0, gp - g))
    n = t.numel()
    if tab16:
        tables.view(torch.float16)[:n].copy_(t.reshape(-1))
    else:
        tables[:n].copy_(t.reshape(-1))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def coded_decode_partial(q_rot, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, work, page_ids, page_lens,
                         part_o, part_lse, *, layout: CodedLayout, num_kv_heads: int, sm_scale: float,
                         logits=None, block_n: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None, byte_lut: bool = True, profile: int = 0,
                         kernel: str = "auto", scratch: torch.Tensor | None = None, tab16: bool | None = None,
                         lut16: bool | None = None, asm_values: bool = True, maxnreg: int | None = None,
                         prefetch: bool = False, row_tables: bool = False, ext: torch.Tensor | None = None,
                         block_m: int | None = None):
    """Split-K partial attention over one coded tier's pages (Triton).

    Returns the compiled Triton kernel (diagnostics: ``n_regs``, ``n_spills``, ``metadata.shared``),
    or None when there is no work. ``kernel`` picks the implementation: ``"rowwise"`` (one thread per
    token, the polar tree unrolled with constant field offsets, level-1 logits from a per-query table;
    :func:`rowwise_supported` layouts), ``"tile"`` (codes expanded to a unit-key tile, tensor-core
    logits; every layout) or ``"auto"`` (row-wise where supported).

    Launch and variant options (tuning; defaults are the best measured on an H100, NOTES.md): ``block_n``
    tokens per tile (default ``min(P, 64)``), ``num_warps`` (row-wise default ``block_n // 64``: two tokens
    per thread), ``num_stages``, ``maxnreg`` (register cap, GPU); row-wise only: ``tab16`` (float16
    level-1 table), ``lut16`` (float16 cos/sin of levels >= 2) — both default to on where the dots are
    float16 (GPU) and off under the interpreter (float32 throughout, for exact comparisons) —,
    ``prefetch`` (code words one tile ahead), ``asm_values`` (value integers to float16 by inline PTX on
    GPU; off: portable Triton); tile only: ``byte_lut`` (level-1 (cos, sin) gathered per code byte). ``profile`` (timing diagnostics only, the output is then wrong): 1 leaves the key decode
    out, 2 the value unpacking, 3 both; row-wise also 4 (no level-1 table gathers) and 5 (no cos/sin
    gathers of levels >= 2).

    Parameters
    ----------
    q_rot : ``[B, Hq, d]`` float32 — queries rotated by ``layout.key_rotation`` (``q @ R.T``).
    k_codes : ``[num_pages, P, key_code_bytes]`` uint8; k_radius : ``[num_pages, P]`` float16;
    k_mean : ``[num_pages, d]`` bfloat16; v_codes : ``[num_pages, P, value_code_bytes]`` uint8;
    v_scale, v_zero : ``[num_pages, P, d / value_group]`` float16 — a :class:`sphkv.pool.TierPool`'s arena.
    work : ``[W, 4]`` int32; page_ids, page_lens : ``[n]`` int32 — one tier of a
        :class:`~sphkv_kernels.schedule.DecodeSchedule`.
    part_o : ``[S, G, d]`` float32, part_lse : ``[S, G]`` float32 — written at each item's slot
        (``o`` in the tier's value storage domain, i.e. still rotated when ``layout.value_rotate``).
    logits : optional ``[n * P, G]`` float32 — receives the log2-domain scaled logits of valid tokens.
    scratch : optional float32 buffer of at least :func:`rowwise_scratch_elems` elements (row-wise
        kernel; allocated per call when absent).
    row_tables : the row-wise kernel reads each row's level-1 table from ``scratch`` as written by
        :func:`coded_row_tables` (same ``tab16``) instead of building one per work item (the other kernels
        ignore it).
    ext : optional ``[W, 3]`` int32 — extend items (tensor-core kernel only, :mod:`sphkv_kernels.extend_tiles`):
        item ``w`` covers query tokens ``ext[w, 0] .. + ext[w, 1] - 1`` (rows of ``q_rot``, at most
        ``block_m // G`` of them) of its row's kv head, token ``k``'s state at slot ``work[w, 3] + k * ext[w, 2]``.
    block_m : query rows per program with ``ext`` (tokens x group, a power of two >= 16; default 64).

    Examples
    --------
    >>> import torch
    >>> from sphkv import SphKVConfig
    >>> from sphkv.pool import TierPool
    >>> from sphkv.tiers import Tier
    >>> from sphkv_kernels.schedule import schedule_decode
    >>> cfg = SphKVConfig.from_name("sphkv-4", head_dim=64, page_size=16)
    >>> pool = TierPool(Tier("sphkv-4", cfg), 4, head_dim=64, page_size=16)
    >>> pool.write(1, torch.randn(16, 64), torch.randn(16, 64)); pool.write(2, torch.randn(5, 64), torch.randn(5, 64))
    >>> s = schedule_decode(torch.tensor([0, 2]), torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([16, 5]),
    ...                     num_tiers=1, pages_per_split=1)
    >>> lay = CodedLayout.from_pool(pool)
    >>> q = torch.randn(1, 3, 64) @ lay.key_rotation.T
    >>> po, pl = torch.empty(s.num_slots, 3, 64), torch.empty(s.num_slots, 3)
    >>> t = s.tiers[0]
    >>> coded_decode_partial_reference(q, *pool.tensors().values(), t.work, t.page_ids, t.page_lens, po, pl,
    ...                                layout=lay, num_kv_heads=1, sm_scale=0.125)
    >>> bool(torch.isfinite(po).all())
    True
    """
    import triton  # noqa: F401

    p = layout.page_size
    b, hq, d, g = _check_common(q_rot, work, page_ids, page_lens, part_o, part_lse, logits, num_kv_heads, p)
    assert layout.kernel_compiles, f"layout head_dim={layout.head_dim} page_size={p} needs the reference"
    assert d == layout.head_dim and q_rot.dtype == torch.float32
    kb, vb, nvg = layout.key_code_bytes, layout.value_code_bytes, layout.num_value_groups
    assert k_codes.dtype == torch.uint8 and k_codes.is_contiguous() and k_codes.shape[1:] == (p, kb)
    num_pages = k_codes.shape[0]
    assert k_radius.dtype == torch.float16 and k_radius.is_contiguous() and k_radius.shape == (num_pages, p)
    assert k_mean.dtype == torch.bfloat16 and k_mean.is_contiguous() and k_mean.shape == (num_pages, d)
    assert v_codes.dtype == torch.uint8 and v_codes.is_contiguous() and v_codes.shape == (num_pages, p, vb)
    if layout.value_bits != 16:
        for t in (v_scale, v_zero):
            assert t.dtype == torch.float16 and t.is_contiguous() and t.shape == (num_pages, p, nvg)
    if kernel not in ("auto", "tc", "rowwise", "tile"):
        raise ValueError(f"kernel={kernel!r}; allowed: 'auto', 'tc', 'rowwise', 'tile'")
    g_pad = _check_ext(ext, work, block_m, g, logits)
    if ext is not None and kernel != "tc":
        raise ValueError(f"ext (extend items) needs kernel='tc', got kernel={kernel!r}")
    w = work.shape[0]
    if w == 0:
        return None
    vbits = layout.value_bits
    ve = 8 // vbits if vbits in (2, 4) else 1
    assert layout.value_group % ve == 0
    consts = layout.on(q_rot.device)
    f16_dot = (not interpreting()) or os.environ.get("SPHKV_FORCE_F16") == "1"
    extra = {} if interpreting() or not maxnreg else {"maxnreg": int(maxnreg)}
    rowwise = rowwise_supported(layout, g) and k_codes.data_ptr() % 4 == 0
    tc = tc_supported(layout, g) and k_codes.data_ptr() % 4 == 0
    if kernel == "tc" and not tc:
        raise ValueError("the tensor-core kernel does not support this layout (see tc_supported)")
    if kernel == "auto" and DEFAULT_CODED_KERNEL == "tc" and not tc:
        _warn_once(("tc", layout.level_bits, layout.head_dim, g),
                   f"sphkv decode: layout head_dim={layout.head_dim} level_bits={layout.level_bits} "
                   f"value_bits={layout.value_bits} group={g} is not covered by the tensor-core kernel; "
                   f"using the {'row-wise' if rowwise else 'tile'} kernel (slower)")
    if (kernel == "tc" or (kernel == "auto" and DEFAULT_CODED_KERNEL == "tc")) and tc:
        from ._coded_tc_kernels import chunk_of, get_kernel

        block_n = block_n or min(p, 64)
        assert p % block_n == 0 and block_n >= 16, f"block_n={block_n} must divide page_size={p} and be >= 16"
        return get_kernel(layout)[(w,)](
            q_rot, q_rot.stride(0), q_rot.stride(1),
            k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, consts["lut16" if f16_dot else "lut"],
            work, ext if ext is not None else work, page_ids, page_lens, part_o, part_lse,
            logits if logits is not None else part_lse, num_kv_heads, float(sm_scale) * LOG2E,
            HEAD_DIM=d, GROUP=g, G_PAD=g_pad, PAGE_SIZE=p, BLOCK_N=block_n, CH=chunk_of(d), EXTEND=ext is not None,
            KW=kb // 4, VBITS=vbits, VE=ve, VGROUP=layout.value_group, VB=vb, NVG=max(nvg, 1),
            HAS_MEAN=layout.has_mean, F16_DOT=f16_dot, STORE_LOGITS=logits is not None,
            ASM_VALUES=bool(asm_values) and f16_dot and not interpreting(),
            PAIRED_WORDS=kb % 8 == 0 and k_codes.data_ptr() % 8 == 0,
            PROFILE=int(profile), num_warps=num_warps or max(1, block_n // 32), num_stages=num_stages or 1, **extra)
    if kernel == "rowwise" and not rowwise:
        raise ValueError("the row-wise kernel does not support this layout (see rowwise_supported)")
    if kernel != "tile" and rowwise:
        from ._coded_rowwise_kernels import _coded_decode_rowwise_kernel

        block_n = block_n or min(p, 64)
        assert p % block_n == 0 and block_n >= 16, f"block_n={block_n} must divide page_size={p} and be >= 16"
        tab16 = f16_dot if tab16 is None else bool(tab16)
        lut16 = f16_dot if lut16 is None else bool(lut16)
        if row_tables:
            need = rowwise_row_table_elems(layout, g, b * num_kv_heads)
            if scratch is None or scratch.numel() < need:
                raise ValueError(f"row_tables=True needs scratch holding coded_row_tables' {need} elements")
        else:
            need = rowwise_scratch_elems(layout, g, w)
            if scratch is None or scratch.numel() < need:
                scratch = torch.empty(need, dtype=torch.float32, device=q_rot.device)
        assert scratch.dtype == torch.float32 and scratch.is_contiguous() and scratch.device == q_rot.device
        return _coded_decode_rowwise_kernel[(w,)](
            q_rot, q_rot.stride(0), q_rot.stride(1),
            k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, consts["lut"], consts["lut16" if lut16 else "lut"],
            scratch, work, page_ids, page_lens, part_o, part_lse, logits if logits is not None else part_lse,
            num_kv_heads, float(sm_scale) * LOG2E,
            HEAD_DIM=d, GROUP=g, GP=_pow2(g), G_PAD=_g_pad(g), PAGE_SIZE=p, BLOCK_N=block_n,
            NUM_LEVELS=layout.num_levels, **layout.key_constexprs(),
            KW=kb // 4, VBITS=vbits, VE=ve, VGROUP=layout.value_group, VB=vb, NVG=max(nvg, 1),
            HAS_MEAN=layout.has_mean, F16_DOT=f16_dot, STORE_LOGITS=logits is not None,
            ASM_VALUES=bool(asm_values) and f16_dot and not interpreting(),
            PAIRED_WORDS=kb % 8 == 0 and k_codes.data_ptr() % 8 == 0, TAB16=bool(tab16), LUT16=bool(lut16),
            PREFETCH=bool(prefetch), ROW_TABLE=bool(row_tables),
            PROFILE=int(profile), num_warps=num_warps or max(1, block_n // 64), num_stages=num_stages or 1, **extra)

    from ._decode_kernels import _coded_decode_kernel

    block_n = block_n or min(p, 64)
    lb1 = layout.level_bits[0]
    byte_lut = bool(byte_lut) and 8 % lb1 == 0 and (d // 2) * lb1 >= 8
    return _coded_decode_kernel[(w,)](
        q_rot, q_rot.stride(0), q_rot.stride(1),
        k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, consts["lut"], consts["lut1"],
        work, page_ids, page_lens, part_o, part_lse, logits if logits is not None else part_lse,
        num_kv_heads, float(sm_scale) * LOG2E,
        HEAD_DIM=d, GROUP=g, G_PAD=_g_pad(g), PAGE_SIZE=p, BLOCK_N=block_n, NUM_LEVELS=layout.num_levels,
        BYTE_LUT=byte_lut, PROFILE=int(profile),
        **layout.key_constexprs(),
        KB=kb, VBITS=vbits, VE=ve, VGROUP=layout.value_group, VB=vb, NVG=max(nvg, 1),
        HAS_MEAN=layout.has_mean, F16_DOT=f16_dot, STORE_LOGITS=logits is not None,
        num_warps=num_warps or 4, num_stages=num_stages or 1, **extra)


def _entries(work: torch.Tensor):
    """Expand work items to their entries: ``(work_id [m], entry [m])`` int64."""
    w = work.to(torch.int64)
    cnt = (w[:, 2] - w[:, 1]).clamp_min(0)
    wid = torch.repeat_interleave(torch.arange(w.shape[0], device=w.device), cnt)
    first = torch.cumsum(cnt, 0) - cnt
    ent = torch.arange(wid.numel(), device=w.device) - first[wid] + w[wid, 1]
    return wid, ent


def _segment_softmax_store(s, vals, wid, work, part_o, part_lse):
    """Per work item softmax of ``s`` ``[m, G, P]`` (log2 domain, -inf masked) against ``vals`` ``[m, P, d]``."""
    w = work.to(torch.int64)
    nw, g = w.shape[0], s.shape[1]
    d = vals.shape[-1]
    m = torch.full((nw, g), float("-inf"), device=s.device).scatter_reduce(
        0, wid[:, None].expand(-1, g), s.amax(-1), "amax")
    m_ref = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp2(s - m_ref[wid][..., None])                                 # [m, G, P]
    l = torch.zeros(nw, g, device=s.device).index_add_(0, wid, p.sum(-1))
    o = torch.zeros(nw, g, d, device=s.device).index_add_(0, wid, p @ vals)
    ok = l > 0
    part_lse[w[:, 3]] = torch.where(ok, m_ref + torch.log2(l.clamp_min(1e-38)), torch.full_like(l, float("-inf")))
    part_o[w[:, 3]] = torch.where(ok[..., None], o / l.clamp_min(1e-38)[..., None], torch.zeros_like(o))


def _gather_queries(q, rows, num_kv_heads, g):
    b, kvh = rows // num_kv_heads, rows % num_kv_heads
    heads = kvh[:, None] * g + torch.arange(g, device=q.device)
    return q[b[:, None], heads].to(torch.float32)                               # [m, G, d]


def coded_decode_partial_reference(q_rot, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, work, page_ids,
                                   page_lens, part_o, part_lse, *, layout: CodedLayout, num_kv_heads: int,
                                   sm_scale: float, logits=None, block_n=None, num_warps=None,
                                   num_stages=None, ext=None, block_m=None) -> None:
    """Pure-PyTorch :func:`coded_decode_partial` (logits from codes via :func:`sphkv.logits.logits_lut`)."""
    p = layout.page_size
    _, _, d, g = _check_common(q_rot, work, page_ids, page_lens, part_o, part_lse, logits, num_kv_heads, p)
    if ext is not None:
        _check_ext(ext, work, block_m, g, logits)
        work = expand_extend_items(work, ext, num_kv_heads)
    if work.shape[0] == 0:
        return
    wid, ent = _entries(work)
    pages = page_ids.to(torch.int64)[ent]
    lens = page_lens.to(torch.int64)[ent]
    qg = _gather_queries(q_rot, work.to(torch.int64)[wid, 0], num_kv_heads, g)
    s = logits_lut(qg, KeyCode(codes=k_codes[pages], radius=k_radius[pages], mean=None), layout.kcodec,
                   rotated=True)                                               # [m, G, P]
    if layout.has_mean:
        s = s + qg @ k_mean[pages].to(torch.float32)[..., None]
    s = s * (sm_scale * LOG2E)
    valid = torch.arange(p, device=s.device)[None, :] < lens[:, None]           # [m, P]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    if logits is not None:
        lg = logits.view(-1, p, g)
        lg[ent] = torch.where(valid[..., None], s.transpose(1, 2), lg[ent])
    vals = layout.vquant.decode_storage(ValueCode(v_codes[pages], v_scale[pages], v_zero[pages]))
    _segment_softmax_store(s, vals, wid, work, part_o, part_lse)


# -------------------------------------------------------------------------------------------------
# dense tier
# -------------------------------------------------------------------------------------------------
def dense_decode_partial(q, k_pages, v_pages, work, page_ids, page_lens, part_o, part_lse, *, num_kv_heads: int,
                         sm_scale: float, logits=None, block_n: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None, ext: torch.Tensor | None = None,
                         block_m: int | None = None) -> None:
    """Split-K partial attention over dense-tier pages (Triton).

    Parameters
    ----------
    q : ``[B, Hq, d]`` bfloat16 / float16 / float32 — queries (not rotated).
    k_pages, v_pages : ``[num_pages, P, d]`` bfloat16 — a dense :class:`sphkv.pool.TierPool`'s arena.
    work, page_ids, page_lens, part_o, part_lse, logits, ext, block_m : as in :func:`coded_decode_partial`.

    Examples
    --------
    >>> import torch
    >>> from sphkv_kernels.schedule import schedule_decode
    >>> k = torch.randn(3, 16, 32).bfloat16(); v = torch.randn(3, 16, 32).bfloat16()
    >>> s = schedule_decode(torch.tensor([0, 2]), torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([16, 7]),
    ...                     num_tiers=1, pages_per_split=4)
    >>> po, pl = torch.empty(s.num_slots, 2, 32), torch.empty(s.num_slots, 2)
    >>> t = s.tiers[0]
    >>> dense_decode_partial_reference(torch.randn(1, 2, 32), k, v, t.work, t.page_ids, t.page_lens, po, pl,
    ...                                num_kv_heads=1, sm_scale=32 ** -0.5)
    >>> po.shape
    torch.Size([1, 2, 32])
    """
    import triton  # noqa: F401

    from ._decode_kernels import _dense_decode_kernel

    assert k_pages.dim() == 3 and k_pages.shape == v_pages.shape and k_pages.is_contiguous() and v_pages.is_contiguous()
    p = k_pages.shape[1]
    b, hq, d, g = _check_common(q, work, page_ids, page_lens, part_o, part_lse, logits, num_kv_heads, p)
    assert k_pages.shape[2] == d and k_pages.dtype == v_pages.dtype
    assert d >= 16 and p >= 16, "the dense kernel needs head_dim >= 16 and page_size >= 16"
    g_pad = _check_ext(ext, work, block_m, g, logits)
    w = work.shape[0]
    if w == 0:
        return
    _dense_decode_kernel[(w,)](
        q, q.stride(0), q.stride(1), k_pages, v_pages, work, ext if ext is not None else work, page_ids, page_lens,
        part_o, part_lse, logits if logits is not None else part_lse, num_kv_heads, float(sm_scale) * LOG2E,
        HEAD_DIM=d, GROUP=g, G_PAD=g_pad, PAGE_SIZE=p, BLOCK_N=block_n or min(p, 64),
        F32_DOT=interpreting() or k_pages.dtype == torch.float32, STORE_LOGITS=logits is not None,
        EXTEND=ext is not None,
        num_warps=num_warps or 4, num_stages=num_stages or 2)


def dense_decode_partial_reference(q, k_pages, v_pages, work, page_ids, page_lens, part_o, part_lse, *,
                                   num_kv_heads: int, sm_scale: float, logits=None, block_n=None, num_warps=None,
                                   num_stages=None, ext=None, block_m=None) -> None:
    """Pure-PyTorch :func:`dense_decode_partial`."""
    p = k_pages.shape[1]
    _, _, d, g = _check_common(q, work, page_ids, page_lens, part_o, part_lse, logits, num_kv_heads, p)
    if ext is not None:
        _check_ext(ext, work, block_m, g, logits)
        work = expand_extend_items(work, ext, num_kv_heads)
    if work.shape[0] == 0:
        return
    wid, ent = _entries(work)
    pages = page_ids.to(torch.int64)[ent]
    lens = page_lens.to(torch.int64)[ent]
    qg = _gather_queries(q, work.to(torch.int64)[wid, 0], num_kv_heads, g)
    s = (qg @ k_pages[pages].to(torch.float32).transpose(-1, -2)) * (sm_scale * LOG2E)   # [m, G, P]
    valid = torch.arange(p, device=s.device)[None, :] < lens[:, None]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    if logits is not None:
        lg = logits.view(-1, p, g)
        lg[ent] = torch.where(valid[..., None], s.transpose(1, 2), lg[ent])
    _segment_softmax_store(s, v_pages[pages].to(torch.float32), wid, work, part_o, part_lse)


# -------------------------------------------------------------------------------------------------
# merge
# -------------------------------------------------------------------------------------------------
def _check_merge(part_o, part_lse, slot_ptr, rotations, out, lse, num_kv_heads):
    s, g, d = part_o.shape
    assert part_o.dtype == torch.float32 and part_o.is_contiguous()
    assert part_lse.dtype == torch.float32 and part_lse.shape == (s, g) and part_lse.is_contiguous()
    assert slot_ptr.dtype == torch.int32 and slot_ptr.dim() == 2 and slot_ptr.is_contiguous()
    rows, nt = slot_ptr.shape[0], slot_ptr.shape[1] - 1
    assert rows % num_kv_heads == 0
    b = rows // num_kv_heads
    assert rotations.dtype == torch.float32 and rotations.shape == (nt, d, d) and rotations.is_contiguous()
    assert out.shape == (b, num_kv_heads * g, d) and out.stride(-1) == 1, \
        f"out must be [{b}, {num_kv_heads * g}, {d}], got {tuple(out.shape)}"
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == (b, num_kv_heads * g) and lse.is_contiguous()
    return b, g, d, nt


def merge_partials(part_o, part_lse, slot_ptr, rotations, out, lse=None, *, num_kv_heads: int,
                   rotate_mask: int, slots_per_step: int | None = None) -> None:
    """Merge the partial states of every (request, kv head) exactly (Triton).

    One program per row reads its slots ``slots_per_step`` at a time (a power of two; default
    ``min(64, 32768 // (GP * d))`` with ``GP`` the group rounded up to a power of two, overridable by the
    environment variable ``SPHKV_MERGE_SLOTS``; 1 is the old one-slot-per-step loop): at batch 1 a row has
    up to ~128 slots, and one memory latency per slot made the merge the largest cost of a batch-1 step.
    The default is the H200's (NOTES.md): 1 x 32K with 256 slots per row 98.7 / 50.7 / 33.3 / 31.1 µs at
    1 / 16 / 32 / 64 slots per step; a ``[SB, GP, d]`` tile above 32K elements spills (GQA 8: 108 µs at 64).

    Parameters
    ----------
    part_o : ``[S, G, d]`` float32, part_lse : ``[S, G]`` float32 — written by the tier kernels.
    slot_ptr : ``[B * Hkv, T + 1]`` int32 — slots of row ``r`` in tier ``t``: ``slot_ptr[r, t]:slot_ptr[r, t+1]``.
    rotations : ``[T, d, d]`` float32 — tier ``t``'s merged output is multiplied by ``rotations[t]``
        when bit ``t`` of ``rotate_mask`` is set (the coded tiers' value rotation, ``R_v``).
    out : ``[B, Hq, d]`` (any float dtype; last dim contiguous) — the attention output.
    lse : optional ``[B, Hq]`` float32 — natural-log log-sum-exp of the scaled logits (``-inf`` if empty).

    Examples
    --------
    >>> import torch
    >>> po, pl = torch.randn(3, 2, 32), torch.randn(3, 2)
    >>> out = torch.empty(1, 2, 32)
    >>> merge_partials_reference(po, pl, torch.tensor([[0, 2, 3]], dtype=torch.int32), torch.eye(32).expand(2, 32, 32).contiguous(),
    ...                          out, num_kv_heads=1, rotate_mask=0)
    >>> w = torch.exp2(pl) / torch.exp2(pl).sum(0)           # part_lse is log2-domain
    >>> bool(torch.allclose(out[0], (w[..., None] * po).sum(0), atol=1e-5))
    True
    """
    from ._decode_kernels import _merge_kernel

    b, g, d, nt = _check_merge(part_o, part_lse, slot_ptr, rotations, out, lse, num_kv_heads)
    rows = slot_ptr.shape[0]
    if rows == 0:
        return
    gp = max(2, _pow2(g))
    sb = slots_per_step or int(os.environ.get("SPHKV_MERGE_SLOTS", "0")) or max(1, min(64, 32768 // (gp * d)))
    if sb < 1 or sb & (sb - 1):
        raise ValueError(f"slots_per_step={sb!r} must be a power of two >= 1")
    _merge_kernel[(rows,)](
        part_o, part_lse, slot_ptr, rotations, out, out.stride(0), out.stride(1),
        lse if lse is not None else part_lse, num_kv_heads,
        HEAD_DIM=d, GROUP=g, GP=gp, G_PAD=_g_pad(g), NUM_TIERS=nt, ROT_MASK=int(rotate_mask),
        WRITE_LSE=lse is not None, DOT_PREC="ieee" if interpreting() else "tf32x3", SB=sb, num_warps=4)


def merge_partials_reference(part_o, part_lse, slot_ptr, rotations, out, lse=None, *, num_kv_heads: int,
                             rotate_mask: int) -> None:
    """Pure-PyTorch :func:`merge_partials`."""
    b, g, d, nt = _check_merge(part_o, part_lse, slot_ptr, rotations, out, lse, num_kv_heads)
    rows = slot_ptr.shape[0]
    sp = slot_ptr.to(torch.int64)
    dev = part_o.device
    m_all = torch.full((rows, g), float("-inf"), device=dev)
    l_all = torch.zeros(rows, g, device=dev)
    acc = torch.zeros(rows, g, d, device=dev)
    for t in range(nt):
        cnt = sp[:, t + 1] - sp[:, t]
        ids = torch.repeat_interleave(torch.arange(rows, device=dev), cnt)
        sl = sp[ids, t] + torch.arange(ids.numel(), device=dev) - (torch.cumsum(cnt, 0) - cnt)[ids]
        lse_s = part_lse[sl]
        m_t = torch.full((rows, g), float("-inf"), device=dev).scatter_reduce(0, ids[:, None].expand(-1, g), lse_s, "amax")
        m_ref = torch.where(torch.isinf(m_t), torch.zeros_like(m_t), m_t)
        w = torch.exp2(lse_s - m_ref[ids])
        l_t = torch.zeros(rows, g, device=dev).index_add_(0, ids, w)
        acc_t = torch.zeros(rows, g, d, device=dev).index_add_(0, ids, part_o[sl] * w[..., None])
        if (rotate_mask >> t) & 1:
            acc_t = acc_t @ rotations[t]
        m_new = torch.maximum(m_all, m_t)
        m_ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        a, w = torch.exp2(m_all - m_ref), torch.exp2(m_t - m_ref)
        acc = acc * a[..., None] + acc_t * w[..., None]
        l_all = l_all * a + l_t * w
        m_all = m_new
    ok = l_all > 0
    o = torch.where(ok[..., None], acc / l_all.clamp_min(1e-38)[..., None], torch.zeros_like(acc))
    out.copy_(o.view(b, num_kv_heads * g, d))
    if lse is not None:
        nat = torch.where(ok, (m_all + torch.log2(l_all.clamp_min(1e-38))) * math.log(2.0),
                          torch.full_like(l_all, float("-inf")))
        lse.copy_(nat.view(b, num_kv_heads * g))
