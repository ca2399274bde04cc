# SPDX-License-Identifier: Apache-2.0
"""Row-wise paged ADA decode kernel (coded tiers): one thread per token, the polar tree unrolled.

Launcher, shape checks and the reference live in :mod:`sphkv_kernels.decode`; conventions (work items,
log2-domain partial states, the ``G_PAD``-row tensor-core dots) are those of
:mod:`sphkv_kernels._decode_kernels`.

How the logits are formed (the design's angular recurrence, top-down):

* a table ``T[i, c, g] = q_rot[g, 2i] cos θ_c + q_rot[g, 2i+1] sin θ_c`` (scaled by ``qk_scale``) over the
  level-1 codes ``c`` of every coordinate pair ``i`` (``[N1, C1, GP]``, 8 KB in float16 at d = 128, 4-bit level 1,
  GP = 4: it stays in L1) — once per row by :func:`_row_tables_kernel` (which also writes ``q_rot``), read by every
  work item of the row (``ROW_TABLE``), or else once per work item in a scratch buffer;
* every token is handled by one thread: its packed code (``KW`` 32-bit words, loaded once) is read with
  constant shifts (field offsets are compile-time constants of the tier), the polar tree is walked
  depth-first with one prefix product per level (``w_i`` = product of the cos/sin of the pair's
  ancestors, cos/sin from a 64–128 byte per-level LUT) and the logit of query ``g`` is
  ``r · Σ_i w_i T[i, c_i, g]`` (+ ``q·μ`` of the page): one vector gather of ``GP`` floats per pair,
  ``~2 d`` multiplies per token, no dense key anywhere;
* values are dequantized into a ``[BLOCK_N, d / VE]`` tile per nibble plane and consumed by tensor-core
  dots against the ``G_PAD``-row probability tile (rows ``>= GP`` are zero).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _field(ws, O: tl.constexpr, W: tl.constexpr):
    """Field of ``W`` bits at bit ``O`` of a token's code, from its words ``ws`` (tuple of ``[BLOCK_N]`` uint32)."""
    K: tl.constexpr = O // 32
    S: tl.constexpr = O % 32
    if S + W <= 32:
        return (ws[K] >> S) & ((1 << W) - 1)
    else:
        return ((ws[K] >> S) | (ws[K + 1] << (32 - S))) & ((1 << W) - 1)


@triton.jit
def _node(ws, lut_ptr, O: tl.constexpr, W: tl.constexpr, LT: tl.constexpr, LUT16: tl.constexpr,
          PROFILE: tl.constexpr):
    """(cos, sin) ``[BLOCK_N]`` float32 of the angle coded at bit ``O`` (``W`` bits; LUT rows at ``LT``;
    ``LUT16``: the LUT holds float16 pairs, 4 bytes per gather instead of 8)."""
    code = _field(ws, O, W).to(tl.int32)
    if PROFILE == 5:                          # diagnostics: no LUT gather
        c = code.to(tl.float32) * 0.01 + 0.6
        s = 0.8 - code.to(tl.float32) * 0.01
    else:
        cs = tl.load(lut_ptr + ((LT + code) * 2)[:, None] + tl.arange(0, 2)[None, :])
        c, s = tl.split(cs)
        if LUT16:
            c = c.to(tl.float32)
            s = s.to(tl.float32)
    return c, s


@triton.jit
def _level(i: tl.constexpr, L: tl.constexpr, ws, lut_ptr, c, s, p, p_up, LB: tl.constexpr, LO: tl.constexpr,
           LT: tl.constexpr, TOP: tl.constexpr, LUT16: tl.constexpr, PROFILE: tl.constexpr):
    """Depth-first step of level ``L`` (>= 2) at pair ``i``: refresh the node's (cos, sin) when pair ``i``
    opens a new level-``L`` node, and the prefix product ``p`` when it enters the other child."""
    if i % (1 << (L - 1)) == 0:
        c, s = _node(ws, lut_ptr, LO + (i >> (L - 1)) * LB, LB, LT, LUT16, PROFILE)
    if i % (1 << (L - 2)) == 0:
        if ((i >> (L - 2)) & 1) == 0:
            f = c
        else:
            f = s
        if TOP:
            p = f
        else:
            p = f * p_up
    return c, s, p


@triton.jit
def _tile_words(kw_base, page_ids_ptr, page_lens_ptr, t, t_end, offs_n, KW: tl.constexpr, PAGE_SIZE: tl.constexpr,
                BLOCK_N: tl.constexpr, TPP: tl.constexpr, PAIRED_WORDS: tl.constexpr, PROFILE: tl.constexpr):
    """The ``KW`` 32-bit code words of every token of tile ``t`` (zeros past ``t_end`` or the page length)."""
    live = t < t_end
    p = tl.where(live, t, t_end - 1) // TPP
    page = tl.load(page_ids_ptr + p).to(tl.int64)
    plen = tl.where(live, tl.load(page_lens_ptr + p), 0)
    n = (t % TPP) * BLOCK_N + offs_n
    valid = n < plen
    kw = kw_base + (page * PAGE_SIZE + n) * KW
    if PROFILE == 1 or PROFILE == 3:          # diagnostics: leave the key decode out
        kw = kw_base + page * 0
    ws = ()
    if PAIRED_WORDS:                          # 8-byte aligned rows: one 64-bit load per two words
        for k in tl.static_range(KW // 2):
            w2 = tl.load(kw[:, None] + (2 * k + tl.arange(0, 2))[None, :], mask=valid[:, None], other=0)
            wa, wb = tl.split(w2)
            ws = ws + (wa, wb)
    else:
        for k in tl.static_range(KW):
            ws = ws + (tl.load(kw + k, mask=valid, other=0),)
    return ws


@triton.jit
def _tuple_set(t, K: tl.constexpr, x, N: tl.constexpr):
    """``t`` (a tuple of ``N`` tensors) with element ``K`` replaced by ``x``."""
    out = ()
    for j in tl.static_range(N):
        if j == K:
            out = out + (x,)
        else:
            out = out + (t[j],)
    return out


@triton.jit
def _planes_asm(byt, VBITS: tl.constexpr):
    """Value integers of a ``[BLOCK_N, NB]`` uint8 tile as exact float16, one tile per field position in a
    byte (``8 / VBITS`` tiles; GPU only: byte permutes and the 0x6400 float16 exponent trick, 1–1.5
    instructions per value)."""
    if VBITS == 4:
        lo, hi = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, k, m, s, n;
            mov.b32 k, 0x64006400;
            mov.b32 m, 0x2C002C00;
            mov.b32 n, 0xD400D400;
            prmt.b32 t0, $4, 0, 0x4140;
            prmt.b32 t1, $4, 0, 0x4342;
            lop3.b32 s, t0, 0x000F000F, k, 0xea;
            sub.f16x2 $0, s, k;
            lop3.b32 s, t1, 0x000F000F, k, 0xea;
            sub.f16x2 $1, s, k;
            lop3.b32 s, t0, 0x00F000F0, k, 0xea;
            fma.rn.f16x2 $2, s, m, n;
            lop3.b32 s, t1, 0x00F000F0, k, 0xea;
            fma.rn.f16x2 $3, s, m, n;
            }""",
            constraints="=r,=r,=r,=r,r", args=[byt], dtype=(tl.float16, tl.float16), is_pure=False, pack=4)
        out = (lo, hi)
    elif VBITS == 8:
        v = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 k, s;
            mov.b32 k, 0x64006400;
            prmt.b32 s, $2, k, 0x7170;
            sub.f16x2 $0, s, k;
            prmt.b32 s, $2, k, 0x7372;
            sub.f16x2 $1, s, k;
            }""",
            constraints="=r,=r,r", args=[byt], dtype=tl.float16, is_pure=False, pack=4)
        out = (v,)
    else:
        p0, p1, p2, p3 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, k, s, m1, n1, m2, n2, m3, n3;
            mov.b32 k, 0x64006400;
            mov.b32 m1, 0x34003400;
            mov.b32 n1, 0xDC00DC00;
            mov.b32 m2, 0x2C002C00;
            mov.b32 n2, 0xD400D400;
            mov.b32 m3, 0x24002400;
            mov.b32 n3, 0xCC00CC00;
            prmt.b32 t0, $8, 0, 0x4140;
            prmt.b32 t1, $8, 0, 0x4342;
            lop3.b32 s, t0, 0x00030003, k, 0xea;
            sub.f16x2 $0, s, k;
            lop3.b32 s, t1, 0x00030003, k, 0xea;
            sub.f16x2 $1, s, k;
            lop3.b32 s, t0, 0x000C000C, k, 0xea;
            fma.rn.f16x2 $2, s, m1, n1;
            lop3.b32 s, t1, 0x000C000C, k, 0xea;
            fma.rn.f16x2 $3, s, m1, n1;
            lop3.b32 s, t0, 0x00300030, k, 0xea;
            fma.rn.f16x2 $4, s, m2, n2;
            lop3.b32 s, t1, 0x00300030, k, 0xea;
            fma.rn.f16x2 $5, s, m2, n2;
            lop3.b32 s, t0, 0x00C000C0, k, 0xea;
            fma.rn.f16x2 $6, s, m3, n3;
            lop3.b32 s, t1, 0x00C000C0, k, 0xea;
            fma.rn.f16x2 $7, s, m3, n3;
            }""",
            constraints="=r,=r,=r,=r,=r,=r,=r,=r,r", args=[byt],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=False, pack=4)
        out = (p0, p1, p2, p3)
    return out


@triton.jit
def _planes(byt, VBITS: tl.constexpr, VE: tl.constexpr, DT: tl.constexpr):
    """Portable :func:`_planes_asm` (interpreter, or float32 dots): tuple of ``VE`` tiles of dtype ``DT``."""
    x = byt.to(tl.int32)
    out = ()
    for e in tl.static_range(VE):
        f = ((x >> (e * VBITS)) & ((1 << VBITS) - 1)) | 0x4B000000
        out = out + ((f.to(tl.float32, bitcast=True) - 8388608.0).to(DT),)
    return out


@triton.jit
def _write_level1_table(qrow, gq, gmask_q, lut_ptr, tab, qk_scale, N1: tl.constexpr, C1: tl.constexpr,
                        GP: tl.constexpr, LT1: tl.constexpr):
    """Store ``T[i, c, g] = qk_scale (q[g, 2i] cos θ_c + q[g, 2i+1] sin θ_c)`` ``[N1, C1, GP]`` at ``tab`` (its dtype)
    from the rotated query rows ``qrow`` ``[GP]`` (float32 pointers; rows ``g >= GROUP`` masked to 0), 16 pairs at a
    time (a whole ``[N1, C1, GP]`` tile would not fit in registers at head_dim 256)."""
    IB: tl.constexpr = 16 if N1 > 16 else N1
    ib = tl.arange(0, IB)
    cc = tl.arange(0, C1)
    cos1 = tl.load(lut_ptr + (LT1 + cc) * 2).to(tl.float32)
    sin1 = tl.load(lut_ptr + (LT1 + cc) * 2 + 1).to(tl.float32)
    for i0 in tl.static_range(0, N1, IB):
        ii = i0 + ib
        qe = tl.load(qrow[None, :] + 2 * ii[:, None], mask=gmask_q[None, :], other=0.0) * qk_scale      # [IB, GP]
        qo = tl.load(qrow[None, :] + 2 * ii[:, None] + 1, mask=gmask_q[None, :], other=0.0) * qk_scale
        t1 = qe[:, None, :] * cos1[None, :, None] + qo[:, None, :] * sin1[None, :, None]              # [IB, C1, GP]
        tl.store(tab + (ii[:, None, None] * C1 + cc[None, :, None]) * GP + gq[None, None, :],
                 t1.to(tab.dtype.element_ty))


@triton.jit
def _row_tables_kernel(q_ptr, stride_qb, stride_qh, rt_ptr, qr_ptr, stride_rb, stride_rh, lut_ptr, tab_ptr,
                       num_kv_heads, qk_scale,
                       HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr,
                       LB1: tl.constexpr, LT1: tl.constexpr, TAB16: tl.constexpr, IB: tl.constexpr):
    """Program ``(row, block)``: for the ``IB`` coordinate pairs ``i`` of ``block`` and the row's ``GROUP`` query heads,
    the rotated query columns ``q_rot[:, 2i]``, ``q_rot[:, 2i+1]`` (``q @ R.T`` by float32 FMAs over 32-wide chunks of
    ``d``; written to ``qr_ptr``, float32) and the row's level-1 table entries ``T[i, c, g] = qk_scale (q_rot[g, 2i]
    cos θ_c + q_rot[g, 2i+1] sin θ_c)`` at ``tab_ptr + row * N1 * C1 * GP`` (layout ``[N1, C1, GP]``, rows
    ``g >= GROUP`` zero), read by every work item of the row (the decode kernel's ``ROW_TABLE``). No barrier, no
    reload: each program writes only what it computed."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    b = (row // num_kv_heads).to(tl.int64)
    kvh = row % num_kv_heads
    N1: tl.constexpr = HEAD_DIM // 2
    C1: tl.constexpr = 1 << LB1
    gq = tl.arange(0, GP)
    gm = gq < GROUP
    heads = (kvh * GROUP + gq).to(tl.int64)
    ii = blk * IB + tl.arange(0, IB)                                                            # pair indices
    KB: tl.constexpr = 32 if HEAD_DIM > 32 else HEAD_DIM
    kk = tl.arange(0, KB)
    qe = tl.zeros([GP, IB], tl.float32)
    qo = tl.zeros([GP, IB], tl.float32)
    for k0 in tl.static_range(0, HEAD_DIM, KB):     # q_rot columns 2i, 2i+1 = q @ R.T[:, 2i], exact float32 FMAs
        qk = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + (k0 + kk)[None, :], mask=gm[:, None],
                     other=0.0).to(tl.float32)                                                  # [GP, KB]
        re = tl.load(rt_ptr + (k0 + kk)[:, None] * HEAD_DIM + 2 * ii[None, :])                  # [KB, IB]
        ro = tl.load(rt_ptr + (k0 + kk)[:, None] * HEAD_DIM + 2 * ii[None, :] + 1)
        qe += tl.sum(qk[:, :, None] * re[None, :, :], 1)
        qo += tl.sum(qk[:, :, None] * ro[None, :, :], 1)
    qrow = qr_ptr + b * stride_rb + heads[:, None] * stride_rh
    tl.store(qrow + 2 * ii[None, :], qe, mask=gm[:, None])
    tl.store(qrow + 2 * ii[None, :] + 1, qo, mask=gm[:, None])
    cc = tl.arange(0, C1)
    cos1 = tl.load(lut_ptr + (LT1 + cc) * 2)
    sin1 = tl.load(lut_ptr + (LT1 + cc) * 2 + 1)
    t = (qe[:, :, None] * cos1[None, None, :] + qo[:, :, None] * sin1[None, None, :]) * qk_scale   # [GP, IB, C1]
    if TAB16:
        tab = tab_ptr.to(tl.pointer_type(tl.float16)) + row.to(tl.int64) * (N1 * C1 * GP)
    else:
        tab = tab_ptr + row.to(tl.int64) * (N1 * C1 * GP)
    tl.store(tab + (ii[None, :, None] * C1 + cc[None, None, :]) * GP + gq[:, None, None], t.to(tab.dtype.element_ty))


@triton.jit
def _coded_decode_rowwise_kernel(
    q_ptr, stride_qb, stride_qh,
    kc_ptr, kr_ptr, km_ptr, vc_ptr, vs_ptr, vz_ptr, lut_ptr, lutn_ptr, tab_ptr,
    work_ptr, page_ids_ptr, page_lens_ptr,
    po_ptr, pl_ptr, logit_ptr,
    num_kv_heads, qk_scale,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, G_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_LEVELS: tl.constexpr,
    LB1: tl.constexpr, LB2: tl.constexpr, LB3: tl.constexpr, LB4: tl.constexpr,
    LB5: tl.constexpr, LB6: tl.constexpr, LB7: tl.constexpr, LB8: tl.constexpr,
    LO1: tl.constexpr, LO2: tl.constexpr, LO3: tl.constexpr, LO4: tl.constexpr,
    LO5: tl.constexpr, LO6: tl.constexpr, LO7: tl.constexpr, LO8: tl.constexpr,
    LT1: tl.constexpr, LT2: tl.constexpr, LT3: tl.constexpr, LT4: tl.constexpr,
    LT5: tl.constexpr, LT6: tl.constexpr, LT7: tl.constexpr, LT8: tl.constexpr,
    KW: tl.constexpr, VBITS: tl.constexpr, VE: tl.constexpr, VGROUP: tl.constexpr, VB: tl.constexpr,
    NVG: tl.constexpr, HAS_MEAN: tl.constexpr, F16_DOT: tl.constexpr, STORE_LOGITS: tl.constexpr,
    ASM_VALUES: tl.constexpr, PAIRED_WORDS: tl.constexpr, TAB16: tl.constexpr, LUT16: tl.constexpr,
    PREFETCH: tl.constexpr, ROW_TABLE: tl.constexpr,
    PROFILE: tl.constexpr,
):
    wid = tl.program_id(0)
    row = tl.load(work_ptr + wid * 4)
    start = tl.load(work_ptr + wid * 4 + 1)
    end = tl.load(work_ptr + wid * 4 + 2)
    slot = tl.load(work_ptr + wid * 4 + 3).to(tl.int64)
    b = row // num_kv_heads
    kvh = row % num_kv_heads

    N1: tl.constexpr = HEAD_DIM // 2
    C1: tl.constexpr = 1 << LB1
    DOT_T: tl.constexpr = tl.float16 if F16_DOT else tl.float32
    TPP: tl.constexpr = PAGE_SIZE // BLOCK_N
    NPAIRS: tl.constexpr = 0 if (PROFILE == 1 or PROFILE == 3) else N1
    gq = tl.arange(0, GP)
    gmask_q = gq < GROUP
    qrow = q_ptr + b.to(tl.int64) * stride_qb + (kvh * GROUP + gq).to(tl.int64) * stride_qh     # [GP]

    # ---- level-1 table: this row's (built once per row by _row_tables_kernel) or this work item's ---------
    if ROW_TABLE:
        tix = row.to(tl.int64)
    else:
        tix = wid.to(tl.int64)
    if TAB16:
        tab = tab_ptr.to(tl.pointer_type(tl.float16)) + tix * (N1 * C1 * GP)
    else:
        tab = tab_ptr + tix * (N1 * C1 * GP)
    if not ROW_TABLE:
        _write_level1_table(qrow, gq, gmask_q, lut_ptr, tab, qk_scale, N1, C1, GP, LT1)
        tl.debug_barrier()

    if HAS_MEAN:
        dd = tl.arange(0, HEAD_DIM)
        qfull = tl.load(qrow[:, None] + dd[None, :], mask=gmask_q[:, None], other=0.0) * qk_scale    # [GP, d]

    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_t = tl.zeros([GP, BLOCK_N], tl.float32)
    NB: tl.constexpr = VGROUP * VBITS // 8            # value bytes of one group of one token
    accs = ()
    for a0 in tl.static_range(NVG * VE):
        accs = accs + (tl.zeros([G_PAD, NB], tl.float32),)
    zs = ()                                            # per-thread partial Σ p·zero of each value group
    for a0 in tl.static_range(NVG):
        zs = zs + (tl.zeros([GP, BLOCK_N], tl.float32),)
    offs_n = tl.arange(0, BLOCK_N)
    rep = tl.arange(0, G_PAD // GP)
    kw_base = kc_ptr.to(tl.pointer_type(tl.uint32))
    qmu = tl.zeros([GP], tl.float32)

    ws_next = _tile_words(kw_base, page_ids_ptr, page_lens_ptr, start * TPP, end * TPP, offs_n, KW, PAGE_SIZE,
                          BLOCK_N, TPP, PAIRED_WORDS, PROFILE)
    for t in range(start * TPP, end * TPP):
        p = t // TPP
        page = tl.load(page_ids_ptr + p).to(tl.int64)
        plen = tl.load(page_lens_ptr + p)
        n = (t % TPP) * BLOCK_N + offs_n
        valid = n < plen
        tok = page * PAGE_SIZE + n                                                   # [BLOCK_N] int64
        radius = tl.load(kr_ptr + tok, mask=valid, other=0.0).to(tl.float32)
        if HAS_MEAN:
            mu = tl.load(km_ptr + page * HEAD_DIM + dd).to(tl.float32)
            qmu = tl.sum(qfull * mu[None, :], 1)                                      # [GP]

        # ---- logits from codes: one thread per token -----------------------------------------------
        if PREFETCH:                # this tile's words were loaded one iteration ahead
            ws = ws_next
            ws_next = _tile_words(kw_base, page_ids_ptr, page_lens_ptr, t + 1, end * TPP, offs_n, KW, PAGE_SIZE,
                                  BLOCK_N, TPP, PAIRED_WORDS, PROFILE)
        else:
            ws = _tile_words(kw_base, page_ids_ptr, page_lens_ptr, t, end * TPP, offs_n, KW, PAGE_SIZE, BLOCK_N,
                             TPP, PAIRED_WORDS, PROFILE)
        acc = tl.zeros([GP, BLOCK_N], tl.float32)
        z = tl.zeros([BLOCK_N], tl.float32)
        c8, s8, p8 = z, z, z
        c7, s7, p7 = z, z, z
        c6, s6, p6 = z, z, z
        c5, s5, p5 = z, z, z
        c4, s4, p4 = z, z, z
        c3, s3, p3 = z, z, z
        c2, s2, p2 = z, z, z
        for i in tl.static_range(NPAIRS):
            if NUM_LEVELS >= 8:
                c8, s8, p8 = _level(i, 8, ws, lutn_ptr, c8, s8, p8, z, LB8, LO8, LT8, NUM_LEVELS == 8,
                                    LUT16, PROFILE)
            if NUM_LEVELS >= 7:
                c7, s7, p7 = _level(i, 7, ws, lutn_ptr, c7, s7, p7, p8, LB7, LO7, LT7, NUM_LEVELS == 7,
                                    LUT16, PROFILE)
            if NUM_LEVELS >= 6:
                c6, s6, p6 = _level(i, 6, ws, lutn_ptr, c6, s6, p6, p7, LB6, LO6, LT6, NUM_LEVELS == 6,
                                    LUT16, PROFILE)
            if NUM_LEVELS >= 5:
                c5, s5, p5 = _level(i, 5, ws, lutn_ptr, c5, s5, p5, p6, LB5, LO5, LT5, NUM_LEVELS == 5,
                                    LUT16, PROFILE)
            if NUM_LEVELS >= 4:
                c4, s4, p4 = _level(i, 4, ws, lutn_ptr, c4, s4, p4, p5, LB4, LO4, LT4, NUM_LEVELS == 4,
                                    LUT16, PROFILE)
            if NUM_LEVELS >= 3:
                c3, s3, p3 = _level(i, 3, ws, lutn_ptr, c3, s3, p3, p4, LB3, LO3, LT3, NUM_LEVELS == 3,
                                    LUT16, PROFILE)
            c2, s2, p2 = _level(i, 2, ws, lutn_ptr, c2, s2, p2, p3, LB2, LO2, LT2, NUM_LEVELS == 2,
                                    LUT16, PROFILE)
            c1 = _field(ws, LO1 + i * LB1, LB1).to(tl.int32)
            if PROFILE == 4:                  # diagnostics: no table gather
                tv = c1[None, :].to(tl.float32) * 0.01 + gq[:, None].to(tl.float32)
            else:
                tv = tl.load(tab + (i * C1 * GP) + c1[None, :] * GP + gq[:, None]).to(tl.float32)   # [GP, BLOCK_N]
            acc += p2[None, :] * tv

        if PROFILE == 1 or PROFILE == 3:
            acc = acc + ws[0].to(tl.float32)[None, :] * 1e-9 + gq[:, None].to(tl.float32)
        s = acc * radius[None, :] + qmu[:, None]
        s = tl.where(valid[None, :], s, float("-inf"))
        if STORE_LOGITS:
            lp = logit_ptr + ((p * PAGE_SIZE + n).to(tl.int64) * GROUP)[None, :] + gq[:, None]
            tl.store(lp, s, mask=valid[None, :] & gmask_q[:, None])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l_t = l_t * alpha[:, None] + pr                  # per-thread partial sums, reduced once at the end
        m_i = m_new
        # [GP, .] -> [G_PAD, .] (rows >= GP zero / one) for the tensor-core dots below
        al16 = tl.reshape(tl.where(rep[:, None] == 0, alpha[None, :], 1.0), [G_PAD])

        # ---- values: per group and field plane; scale folded into the probabilities, zero added once --
        vrow = vc_ptr + tok * VB
        for grp in tl.static_range(NVG):
            sc = tl.load(vs_ptr + tok * NVG + grp, mask=valid, other=0.0).to(tl.float32)        # [BLOCK_N]
            zr = tl.load(vz_ptr + tok * NVG + grp, mask=valid, other=0.0).to(tl.float32)
            zs = _tuple_set(zs, grp, zs[grp] * alpha[:, None] + pr * zr[None, :], NVG)
            pw = tl.reshape(tl.where(rep[:, None, None] == 0, (pr * sc[None, :])[None, :, :], 0.0),
                            [G_PAD, BLOCK_N]).to(DOT_T)
            byt = tl.load(vrow[:, None] + grp * NB + tl.arange(0, NB)[None, :], mask=valid[:, None], other=0)
            if PROFILE == 2 or PROFILE == 3:  # diagnostics: leave the value unpacking out
                planes = ()
                for e in tl.static_range(VE):
                    planes = planes + ((byt.to(tl.float32) * 0.0 + sc[:, None]).to(DOT_T),)
            elif ASM_VALUES:
                planes = _planes_asm(byt, VBITS)
            else:
                planes = _planes(byt, VBITS, VE, DOT_T)
            for e in tl.static_range(VE):
                accs = _tuple_set(accs, grp * VE + e, accs[grp * VE + e] * al16[:, None] + tl.dot(pw, planes[e]),
                                  NVG * VE)

    l_i = tl.sum(l_t, 1)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse2 = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(pl_ptr + slot * GROUP + gq, lse2, mask=gmask_q)
    g16 = tl.arange(0, G_PAD)
    l16 = tl.reshape(tl.where(rep[:, None] == 0, l_safe[None, :], 1.0), [G_PAD])
    jj = tl.arange(0, NB)
    om = (g16 < GROUP)[:, None]
    for grp in tl.static_range(NVG):
        z16 = tl.reshape(tl.where(rep[:, None] == 0, tl.sum(zs[grp], 1)[None, :], 0.0), [G_PAD])
        for e in tl.static_range(VE):
            col = grp * VGROUP + VE * jj + e
            ob = po_ptr + (slot * GROUP + g16)[:, None] * HEAD_DIM + col[None, :]
            tl.store(ob, (accs[grp * VE + e] + z16[:, None]) / l16[:, None], mask=om)
