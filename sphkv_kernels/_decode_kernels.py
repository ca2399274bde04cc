# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of paged ADA decode: one partial (split-K) kernel per page tier, and the merge.

Launchers, shape checks and the pure-PyTorch references live in :mod:`sphkv_kernels.decode`.
Conventions shared by all kernels here:

* work item ``w`` = ``work[w] = (row, start, end, slot)``: ``row = request * num_kv_heads + kv_head``;
  the item covers entries ``start..end-1`` of the tier's page list (``page_ids``/``page_lens``) and
  writes its partial softmax state to ``slot``;
* logits are kept in the log2 domain (``qk_scale = sm_scale * log2(e)``), partial states are
  ``(o = Σ p v / Σ p, lse2 = m + log2 Σ p)``; an item without valid tokens writes ``o = 0, lse2 = -inf``;
* the GQA group (``GROUP`` query heads of one kv head) is padded to ``G_PAD >= 16`` rows so the
  logits and ``p @ V`` are tensor-core dots that share one load of each key/value tile.
"""
from __future__ import annotations

import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------
# code unpacking helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fields(row_ptr, mask_row, OFF: tl.constexpr, N_F: tl.constexpr, W: tl.constexpr):
    """``N_F`` fields of ``W`` bits starting at bit ``OFF`` of each row → ``[BLOCK_N, N_F]`` int32."""
    GCD: tl.constexpr = 8 if W % 8 == 0 else (4 if W % 4 == 0 else (2 if W % 2 == 0 else 1))
    GB: tl.constexpr = W // GCD                           # bytes of one group of whole fields
    GF: tl.constexpr = 8 // GCD                           # fields per group
    if (OFF % 8 == 0) and (8 % W == 0) and (N_F * W >= 8):
        # byte-aligned fields: one contiguous load, split every byte into 8 / W fields
        E: tl.constexpr = 8 // W
        NB: tl.constexpr = N_F // E
        byt = tl.load(row_ptr[:, None] + (OFF // 8 + tl.arange(0, NB))[None, :], mask=mask_row[:, None], other=0)
        f = (byt.to(tl.int32)[:, :, None] >> (tl.arange(0, E) * W)[None, None, :]) & ((1 << W) - 1)
        return tl.reshape(f, [row_ptr.shape[0], N_F])
    elif (OFF % 8 == 0) and (GB <= 3) and (N_F % GF == 0):
        # byte-aligned groups of GF fields in GB <= 3 bytes (e.g. 8 fields of 3 bits in 3 bytes):
        # assemble each group into an int32 from GB byte loads, then shift the fields out
        NG: tl.constexpr = N_F // GF
        b = tl.arange(0, 4)
        off = OFF // 8 + tl.arange(0, NG)[:, None] * GB + b[None, :]                       # [NG, 4]
        byt = tl.load(row_ptr[:, None, None] + off[None, :, :], mask=mask_row[:, None, None] & (b < GB)[None, None, :],
                      other=0).to(tl.int32)
        word = tl.sum(byt << (8 * b)[None, None, :], 2)                                    # [BLOCK_N, NG]
        f = (word[:, :, None] >> (tl.arange(0, GF) * W)[None, None, :]) & ((1 << W) - 1)
        return tl.reshape(f, [row_ptr.shape[0], N_F])
    else:
        o = OFF + tl.arange(0, N_F) * W
        sh = o & 7
        ptr = row_ptr[:, None] + (o >> 3)[None, :]
        lo = tl.load(ptr, mask=mask_row[:, None], other=0).to(tl.int32)
        hi = tl.load(ptr + 1, mask=mask_row[:, None] & ((sh + W) > 8)[None, :], other=0).to(tl.int32)
        return ((lo | (hi << 8)) >> sh[None, :]) & ((1 << W) - 1)


@triton.jit
def _cos_sin(lut_ptr, code, LT: tl.constexpr):
    """(cos, sin) of the centers ``code`` ``[BLOCK_N, n]`` of the level whose LUT starts at ``LT``."""
    cs = tl.load(lut_ptr + ((LT + code) * 2)[:, :, None] + tl.arange(0, 2)[None, None, :])
    return tl.split(cs)


@triton.jit
def _descend(u, row_ptr, mask_row, lut_ptr, OFF: tl.constexpr, N_F: tl.constexpr, W: tl.constexpr,
             LT: tl.constexpr):
    """One level of the polar tree, top-down: pair radii ``u`` ``[BLOCK_N, N_F]`` → ``[BLOCK_N, 2 N_F]``."""
    c, s = _cos_sin(lut_ptr, _fields(row_ptr, mask_row, OFF, N_F, W), LT)
    return tl.reshape(tl.join(u * c, u * s), [u.shape[0], 2 * N_F])


@triton.jit
def _unit_pairs(row_ptr, mask_row, lut_ptr, lut1_ptr, BYTE_LUT: tl.constexpr, HEAD_DIM: tl.constexpr,
                NUM_LEVELS: tl.constexpr,
                LB1: tl.constexpr, LB2: tl.constexpr, LB3: tl.constexpr, LB4: tl.constexpr,
                LB5: tl.constexpr, LB6: tl.constexpr, LB7: tl.constexpr, LB8: tl.constexpr,
                LO1: tl.constexpr, LO2: tl.constexpr, LO3: tl.constexpr, LO4: tl.constexpr,
                LO5: tl.constexpr, LO6: tl.constexpr, LO7: tl.constexpr, LO8: tl.constexpr,
                LT1: tl.constexpr, LT2: tl.constexpr, LT3: tl.constexpr, LT4: tl.constexpr,
                LT5: tl.constexpr, LT6: tl.constexpr, LT7: tl.constexpr, LT8: tl.constexpr):
    """Unit key direction from packed codes, split by coordinate parity: ``(u_even, u_odd)`` ``[BLOCK_N, d/2]``."""
    u = tl.full([row_ptr.shape[0], 1], 1.0, tl.float32)
    if NUM_LEVELS >= 8:
        u = _descend(u, row_ptr, mask_row, lut_ptr, LO8, HEAD_DIM >> 8, LB8, LT8)
    if NUM_LEVELS >= 7:
        u = _descend(u, row_ptr, mask_row, lut_ptr, LO7, HEAD_DIM >> 7, LB7, LT7)
    if NUM_LEVELS >= 6:
        u = _descend(u, row_ptr, mask_row, lut_ptr, LO6, HEAD_DIM >> 6, LB6, LT6)
    if NUM_LEVELS >= 5:
        u = _descend(u, row_ptr, mask_row, lut_ptr, LO5, HEAD_DIM >> 5, LB5, LT5)
    if NUM_LEVELS >= 4:
        u = _descend(u, row_ptr, mask_row, lut_ptr, LO4, HEAD_DIM >> 4, LB4, LT4)
    if NUM_LEVELS >= 3:
        u = _descend(u, row_ptr, mask_row, lut_ptr, LO3, HEAD_DIM >> 3, LB3, LT3)
    u = _descend(u, row_ptr, mask_row, lut_ptr, LO2, HEAD_DIM >> 2, LB2, LT2)
    if BYTE_LUT:
        # level 1 is byte-aligned: one gather per code byte from a 256-entry table of its fields' (cos, sin)
        E1: tl.constexpr = 8 // LB1
        NB1: tl.constexpr = HEAD_DIM // 2 // E1
        byt = tl.load(row_ptr[:, None] + tl.arange(0, NB1)[None, :], mask=mask_row[:, None], other=0).to(tl.int32)
        cs = tl.load(lut1_ptr + (byt * (2 * E1))[:, :, None] + tl.arange(0, 2 * E1)[None, None, :])
        c, s = tl.split(tl.reshape(cs, [row_ptr.shape[0], HEAD_DIM // 2, 2]))
    else:
        c, s = _cos_sin(lut_ptr, _fields(row_ptr, mask_row, LO1, HEAD_DIM // 2, LB1), LT1)
    return u * c, u * s


@triton.jit
def _int_to_f32(x):
    """Exact float of a small non-negative int32 (< 2**23) without the slow int→float conversion."""
    return (x | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


# ---------------------------------------------------------------------------------------------
# coded tier: partial attention over angle-coded keys and group-quantized values
# ---------------------------------------------------------------------------------------------
@triton.jit
def _coded_decode_kernel(
    q_ptr, stride_qb, stride_qh,
    kc_ptr, kr_ptr, km_ptr, vc_ptr, vs_ptr, vz_ptr, lut_ptr, lut1_ptr,
    work_ptr, page_ids_ptr, page_lens_ptr,
    po_ptr, pl_ptr, logit_ptr,
    num_kv_heads, qk_scale,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_LEVELS: tl.constexpr, BYTE_LUT: tl.constexpr, PROFILE: tl.constexpr,
    LB1: tl.constexpr, LB2: tl.constexpr, LB3: tl.constexpr, LB4: tl.constexpr,
    LB5: tl.constexpr, LB6: tl.constexpr, LB7: tl.constexpr, LB8: tl.constexpr,
    LO1: tl.constexpr, LO2: tl.constexpr, LO3: tl.constexpr, LO4: tl.constexpr,
    LO5: tl.constexpr, LO6: tl.constexpr, LO7: tl.constexpr, LO8: tl.constexpr,
    LT1: tl.constexpr, LT2: tl.constexpr, LT3: tl.constexpr, LT4: tl.constexpr,
    LT5: tl.constexpr, LT6: tl.constexpr, LT7: tl.constexpr, LT8: tl.constexpr,
    KB: tl.constexpr, VBITS: tl.constexpr, VE: tl.constexpr, VGROUP: tl.constexpr, VB: tl.constexpr,
    NVG: tl.constexpr, HAS_MEAN: tl.constexpr, F16_DOT: tl.constexpr, STORE_LOGITS: tl.constexpr,
):
    wid = tl.program_id(0)
    row = tl.load(work_ptr + wid * 4)
    start = tl.load(work_ptr + wid * 4 + 1)
    end = tl.load(work_ptr + wid * 4 + 2)
    slot = tl.load(work_ptr + wid * 4 + 3).to(tl.int64)
    b = row // num_kv_heads
    kvh = row % num_kv_heads

    N1: tl.constexpr = HEAD_DIM // 2
    NBT: tl.constexpr = HEAD_DIM // VE           # value columns per accumulator
    g = tl.arange(0, G_PAD)
    gmask = g < GROUP
    j = tl.arange(0, N1)
    qrow = q_ptr + b.to(tl.int64) * stride_qb + (kvh * GROUP + g).to(tl.int64) * stride_qh
    qe = tl.load(qrow[:, None] + 2 * j[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * qk_scale
    qo = tl.load(qrow[:, None] + 2 * j[None, :] + 1, mask=gmask[:, None], other=0.0).to(tl.float32) * qk_scale
    if F16_DOT:
        qe_d = qe.to(tl.float16)
        qo_d = qo.to(tl.float16)
    else:
        qe_d = qe
        qo_d = qo

    m_i = tl.full([G_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc0 = tl.zeros([G_PAD, NBT], tl.float32)
    acc1 = tl.zeros([G_PAD, NBT], tl.float32)
    acc2 = tl.zeros([G_PAD, NBT], tl.float32)
    acc3 = tl.zeros([G_PAD, NBT], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    qmu = tl.zeros([G_PAD], tl.float32)

    for p in range(start, end):
        page = tl.load(page_ids_ptr + p).to(tl.int64)
        plen = tl.load(page_lens_ptr + p)
        if HAS_MEAN:
            me = tl.load(km_ptr + page * HEAD_DIM + 2 * j).to(tl.float32)
            mo = tl.load(km_ptr + page * HEAD_DIM + 2 * j + 1).to(tl.float32)
            qmu = tl.sum(qe * me[None, :], 1) + tl.sum(qo * mo[None, :], 1)
        for s0 in range(0, plen, BLOCK_N):
            n = s0 + offs_n
            valid = n < plen
            tok = page * PAGE_SIZE + n                                   # [BLOCK_N] int64
            radius = tl.load(kr_ptr + tok, mask=valid, other=0.0).to(tl.float32)
            if PROFILE == 1 or PROFILE == 3:          # diagnostics: leave the key decode out
                ue = tl.full([BLOCK_N, N1], 0.0625, tl.float32) + radius[:, None] * 0.0
                uo = ue
            else:
                ue, uo = _unit_pairs(kc_ptr + tok * KB, valid, lut_ptr, lut1_ptr, BYTE_LUT, HEAD_DIM, NUM_LEVELS,
                                     LB1, LB2, LB3, LB4, LB5, LB6, LB7, LB8,
                                     LO1, LO2, LO3, LO4, LO5, LO6, LO7, LO8,
                                     LT1, LT2, LT3, LT4, LT5, LT6, LT7, LT8)
            if F16_DOT:
                ue = ue.to(tl.float16)
                uo = uo.to(tl.float16)
            s = tl.dot(qe_d, tl.trans(ue)) + tl.dot(qo_d, tl.trans(uo))  # [G_PAD, BLOCK_N]
            s = s * radius[None, :]
            if HAS_MEAN:
                s = s + qmu[:, None]
            s = tl.where(valid[None, :], s, float("-inf"))
            if STORE_LOGITS:
                lp = logit_ptr + ((p * PAGE_SIZE + n).to(tl.int64) * GROUP)[None, :] + g[:, None]
                tl.store(lp, s, mask=valid[None, :] & gmask[:, None])
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            pr = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            m_i = m_new
            if F16_DOT:
                pr_d = pr.to(tl.float16)
            else:
                pr_d = pr
            if VBITS == 16:
                v16 = vc_ptr.to(tl.pointer_type(tl.bfloat16))
                v = tl.load(v16 + tok[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :],
                            mask=valid[:, None], other=0.0)
                if F16_DOT:
                    v = v.to(tl.float16)
                else:
                    v = v.to(tl.float32)
                acc0 = acc0 * alpha[:, None] + tl.dot(pr_d, v)
            else:
                gi = tl.arange(0, NVG)
                sc = tl.load(vs_ptr + tok[:, None] * NVG + gi[None, :], mask=valid[:, None], other=0.0)
                zr = tl.load(vz_ptr + tok[:, None] * NVG + gi[None, :], mask=valid[:, None], other=0.0)
                GC: tl.constexpr = VGROUP // VE     # columns of one value group inside a tile
                scx = tl.reshape(tl.broadcast_to(sc.to(tl.float32)[:, :, None], [BLOCK_N, NVG, GC]), [BLOCK_N, NBT])
                zrx = tl.reshape(tl.broadcast_to(zr.to(tl.float32)[:, :, None], [BLOCK_N, NVG, GC]), [BLOCK_N, NBT])
                vrow = vc_ptr + tok * VB
                if PROFILE >= 2:          # diagnostics: leave the value unpacking out
                    v = zrx + scx
                    if F16_DOT:
                        v = v.to(tl.float16)
                    acc0 = acc0 * alpha[:, None] + tl.dot(pr_d, v)
                    acc1 = acc1 * alpha[:, None] + tl.dot(pr_d, v)
                elif VE == 1:
                    if VBITS == 8:
                        qv = tl.load(vrow[:, None] + tl.arange(0, HEAD_DIM)[None, :], mask=valid[:, None],
                                     other=0).to(tl.int32)
                    else:
                        qv = _fields(vrow, valid, 0, HEAD_DIM, VBITS)
                    v = zrx + _int_to_f32(qv) * scx
                    if F16_DOT:
                        v = v.to(tl.float16)
                    acc0 = acc0 * alpha[:, None] + tl.dot(pr_d, v)
                else:
                    MASK: tl.constexpr = (1 << VBITS) - 1
                    byt = tl.load(vrow[:, None] + tl.arange(0, NBT)[None, :], mask=valid[:, None], other=0).to(tl.int32)
                    v = zrx + _int_to_f32(byt & MASK) * scx
                    if F16_DOT:
                        v = v.to(tl.float16)
                    acc0 = acc0 * alpha[:, None] + tl.dot(pr_d, v)
                    v = zrx + _int_to_f32((byt >> VBITS) & MASK) * scx
                    if F16_DOT:
                        v = v.to(tl.float16)
                    acc1 = acc1 * alpha[:, None] + tl.dot(pr_d, v)
                    if VE == 4:
                        v = zrx + _int_to_f32((byt >> (2 * VBITS)) & MASK) * scx
                        if F16_DOT:
                            v = v.to(tl.float16)
                        acc2 = acc2 * alpha[:, None] + tl.dot(pr_d, v)
                        v = zrx + _int_to_f32((byt >> (3 * VBITS)) & MASK) * scx
                        if F16_DOT:
                            v = v.to(tl.float16)
                        acc3 = acc3 * alpha[:, None] + tl.dot(pr_d, v)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse2 = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(pl_ptr + slot * GROUP + g, lse2, mask=gmask)
    ob = po_ptr + (slot * GROUP + g)[:, None] * HEAD_DIM + VE * tl.arange(0, NBT)[None, :]
    om = gmask[:, None]
    tl.store(ob, acc0 / l_safe[:, None], mask=om)
    if VE >= 2:
        tl.store(ob + 1, acc1 / l_safe[:, None], mask=om)
    if VE == 4:
        tl.store(ob + 2, acc2 / l_safe[:, None], mask=om)
        tl.store(ob + 3, acc3 / l_safe[:, None], mask=om)


# ---------------------------------------------------------------------------------------------
# dense tier: partial attention over bf16 pages
# ---------------------------------------------------------------------------------------------
@triton.jit
def _query_rows(q_ptr, stride_qb, stride_qh, ext_ptr, wid, b, kvh, slot, GROUP: tl.constexpr, G_PAD: tl.constexpr,
                EXTEND: tl.constexpr):
    """The ``G_PAD`` query rows of work item ``wid``: ``(mask [G_PAD], q row pointers [G_PAD], partial row [G_PAD])``.

    Decode (``EXTEND`` false): the ``GROUP`` query heads of kv head ``kvh`` of request ``b``, partial rows
    ``slot * GROUP + g``. Extend: a block of new tokens times the group, row ``i`` = (token ``i // GROUP``, head
    ``i % GROUP``), ``ext[wid] = (tok0, ntok, slot_stride)`` int32: tokens ``tok0 .. tok0 + ntok - 1`` (rows of
    ``q``), token ``k``'s partial state at slot ``slot + k * slot_stride`` (every token its own slots, so the decode
    merge combines them per (token, kv head))."""
    gq = tl.arange(0, G_PAD)
    if EXTEND:
        tok0 = tl.load(ext_ptr + wid * 3)
        ntok = tl.load(ext_ptr + wid * 3 + 1)
        sstride = tl.load(ext_ptr + wid * 3 + 2).to(tl.int64)
        tq = gq // GROUP
        hq = gq % GROUP
        gmask = tq < ntok
        qrow = q_ptr + (tok0 + tq).to(tl.int64) * stride_qb + (kvh * GROUP + hq).to(tl.int64) * stride_qh
        orow = (slot + tq.to(tl.int64) * sstride) * GROUP + hq
    else:
        gmask = gq < GROUP
        qrow = q_ptr + b.to(tl.int64) * stride_qb + (kvh * GROUP + gq).to(tl.int64) * stride_qh
        orow = slot * GROUP + gq
    return gmask, qrow, orow


@triton.jit
def _dense_decode_kernel(
    q_ptr, stride_qb, stride_qh, k_ptr, v_ptr,
    work_ptr, ext_ptr, page_ids_ptr, page_lens_ptr,
    po_ptr, pl_ptr, logit_ptr,
    num_kv_heads, qk_scale,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr, STORE_LOGITS: tl.constexpr, EXTEND: tl.constexpr,
):
    wid = tl.program_id(0)
    row = tl.load(work_ptr + wid * 4)
    start = tl.load(work_ptr + wid * 4 + 1)
    end = tl.load(work_ptr + wid * 4 + 2)
    slot = tl.load(work_ptr + wid * 4 + 3).to(tl.int64)
    b = row // num_kv_heads
    kvh = row % num_kv_heads
    g = tl.arange(0, G_PAD)
    gmask, qrow, orow = _query_rows(q_ptr, stride_qb, stride_qh, ext_ptr, wid, b, kvh, slot, GROUP, G_PAD, EXTEND)
    dcol = tl.arange(0, HEAD_DIM)
    q = tl.load(qrow[:, None] + dcol[None, :], mask=gmask[:, None], other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)
    else:
        q = q.to(tl.bfloat16)
    m_i = tl.full([G_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for p in range(start, end):
        page = tl.load(page_ids_ptr + p).to(tl.int64)
        plen = tl.load(page_lens_ptr + p)
        for s0 in range(0, plen, BLOCK_N):
            n = s0 + offs_n
            valid = n < plen
            tok = page * PAGE_SIZE + n
            kt = tl.load(k_ptr + tok[:, None] * HEAD_DIM + dcol[None, :], mask=valid[:, None], other=0.0)
            vt = tl.load(v_ptr + tok[:, None] * HEAD_DIM + dcol[None, :], mask=valid[:, None], other=0.0)
            if F32_DOT:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt)) * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            if STORE_LOGITS:
                lp = logit_ptr + ((p * PAGE_SIZE + n).to(tl.int64) * GROUP)[None, :] + g[:, None]
                tl.store(lp, s, mask=valid[None, :] & gmask[:, None])
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            pr = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            m_i = m_new
            acc = acc * alpha[:, None] + tl.dot(pr.to(vt.dtype), vt)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse2 = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(pl_ptr + orow, lse2, mask=gmask)
    tl.store(po_ptr + orow[:, None] * HEAD_DIM + dcol[None, :], acc / l_safe[:, None], mask=gmask[:, None])


# ---------------------------------------------------------------------------------------------
# merge of partial states (exact), with each tier's value rotation undone once
# ---------------------------------------------------------------------------------------------
@triton.jit
def _merge_kernel(
    po_ptr, pl_ptr, slot_ptr, rot_ptr, out_ptr, stride_ob, stride_oh, lse_ptr, num_kv_heads,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, G_PAD: tl.constexpr, NUM_TIERS: tl.constexpr,
    ROT_MASK: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PREC: tl.constexpr, SB: tl.constexpr,
):
    """One program per row: its slots are read SB at a time (``[SB, GP, d]`` tiles, one memory latency per
    block instead of one per slot: a batch-1 row has ~128 slots); the per-tier value rotation is a tensor-core
    dot on a ``[G_PAD, d]`` tile whose rows ``>= GP`` are zero (rows copied in and out with selects, no reshape)."""
    row = tl.program_id(0)
    b = row // num_kv_heads
    kvh = row % num_kv_heads
    g = tl.arange(0, GP)                       # GP = next power of two >= max(GROUP, 2)
    gmask = g < GROUP
    g16 = tl.arange(0, G_PAD)
    dcol = tl.arange(0, HEAD_DIM)
    sb = tl.arange(0, SB)
    m_all = tl.full([GP], float("-inf"), tl.float32)
    l_all = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, HEAD_DIM], tl.float32)
    for t in tl.static_range(NUM_TIERS):
        lo = tl.load(slot_ptr + row * (NUM_TIERS + 1) + t)
        hi = tl.load(slot_ptr + row * (NUM_TIERS + 1) + t + 1)
        m_t = tl.full([GP], float("-inf"), tl.float32)
        l_t = tl.zeros([GP], tl.float32)
        acc_t = tl.zeros([GP, HEAD_DIM], tl.float32)
        for s0 in range(lo, hi, SB):
            sl = s0 + sb                                                                  # [SB]
            ok = (sl < hi)[:, None] & gmask[None, :]                                      # [SB, GP]
            sg = sl.to(tl.int64)[:, None] * GROUP + g[None, :]
            lse = tl.load(pl_ptr + sg, mask=ok, other=float("-inf"))
            ob = tl.load(po_ptr + sg[:, :, None] * HEAD_DIM + dcol[None, None, :], mask=ok[:, :, None], other=0.0)
            # (names distinct from the tier-level ones below: static_range unrolls tiers, and a name bound there
            # with another shape would become a loop-carried variable of the next tier's slot loop)
            mb_new = tl.maximum(m_t, tl.max(lse, 0))
            mb_ref = tl.where(mb_new == float("-inf"), 0.0, mb_new)
            ab = tl.exp2(m_t - mb_ref)
            wb = tl.exp2(lse - mb_ref[None, :])                                           # [SB, GP]; 0 where masked
            acc_t = acc_t * ab[:, None] + tl.sum(ob * wb[:, :, None], 0)
            l_t = l_t * ab + tl.sum(wb, 0)
            m_t = mb_new
        if (ROT_MASK >> t) & 1:
            rot = tl.load(rot_ptr + t * HEAD_DIM * HEAD_DIM + dcol[:, None] * HEAD_DIM + dcol[None, :])
            a16 = tl.zeros([G_PAD, HEAD_DIM], tl.float32)
            for i in tl.static_range(GP):
                r_i = tl.sum(tl.where(g[:, None] == i, acc_t, 0.0), 0)
                a16 = tl.where(g16[:, None] == i, r_i[None, :], a16)
            r16 = tl.dot(a16, rot, input_precision=DOT_PREC)
            for i in tl.static_range(GP):
                r_i = tl.sum(tl.where(g16[:, None] == i, r16, 0.0), 0)
                acc_t = tl.where(g[:, None] == i, r_i[None, :], acc_t)
        m_new = tl.maximum(m_all, m_t)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m_all - m_ref)
        w = tl.exp2(m_t - m_ref)
        acc = acc * a[:, None] + acc_t * w[:, None]
        l_all = l_all * a + l_t * w
        m_all = m_new
    l_safe = tl.where(l_all > 0, l_all, 1.0)
    o = acc / l_safe[:, None]
    orow = out_ptr + b.to(tl.int64) * stride_ob + (kvh * GROUP + g).to(tl.int64) * stride_oh
    tl.store(orow[:, None] + dcol[None, :], o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    if WRITE_LSE:
        lse_nat = tl.where(l_all > 0, (m_all + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + b.to(tl.int64) * (num_kv_heads * GROUP) + kvh * GROUP + g, lse_nat, mask=gmask)
