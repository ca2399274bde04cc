# SPDX-License-Identifier: Apache-2.0
"""Triton kernel that encodes whole pages of keys and values into a coded tier's page arena.

One program per written page of already-rotated keys/values (the launcher rotates them with one
cuBLAS GEMM): take the page mean (rounded to bf16, as the codec does),
center, run the recursive polar transform bottom-up, bucketize every angle against the level's
decision thresholds *without* atan2 (sign tests of cross products with the thresholds' cos/sin),
pack the codes little-endian (``sphkv.packing`` layout) and quantize the values per group.
Launcher and reference: :mod:`sphkv_kernels.encode`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _bucket_quadrant(a, b, thr_ptr, LT: tl.constexpr, W: tl.constexpr):
    """Code of ``ψ = atan2(b, a)`` (``a, b >= 0``): the number of thresholds ``t_k < ψ``."""
    k = tl.arange(0, 1 << W)
    tc = tl.load(thr_ptr + (LT + k) * 4)
    ts = tl.load(thr_ptr + (LT + k) * 4 + 1)
    real = tl.load(thr_ptr + (LT + k) * 4 + 3) > 0.5
    gt = (b[:, :, None] * tc[None, None, :] - a[:, :, None] * ts[None, None, :]) > 0
    return tl.sum((gt & real[None, None, :]).to(tl.int32), 2)


@triton.jit
def _bucket_circle(x, y, thr_ptr, LT: tl.constexpr, W: tl.constexpr):
    """Code of ``θ = atan2(y, x) mod 2π``: the number of thresholds ``t_k < θ`` (half-plane + cross-product tests)."""
    k = tl.arange(0, 1 << W)
    tc = tl.load(thr_ptr + (LT + k) * 4)
    ts = tl.load(thr_ptr + (LT + k) * 4 + 1)
    t_upper = tl.load(thr_ptr + (LT + k) * 4 + 2) > 0.5          # t_k < π
    real = tl.load(thr_ptr + (LT + k) * 4 + 3) > 0.5
    upper = (y > 0) | ((y == 0) & (x >= 0))                      # θ in [0, π)
    cross = (y[:, :, None] * tc[None, None, :] - x[:, :, None] * ts[None, None, :]) > 0
    up3 = upper[:, :, None]
    tu3 = t_upper[None, None, :]
    gt = tl.where(tu3, (~up3) | cross, (~up3) & cross)
    return tl.sum((gt & real[None, None, :]).to(tl.int32), 2)


@triton.jit
def _pack_words(words, code, OFF: tl.constexpr, N_F: tl.constexpr, W: tl.constexpr, NW: tl.constexpr):
    """OR ``N_F`` fields of ``W`` bits (bit offset ``OFF``) of ``code`` ``[R, N_F]`` into ``words`` ``[R, NW]`` int32."""
    o = OFF + tl.arange(0, N_F) * W
    wi = o >> 5
    sh = o & 31
    lo = code << sh[None, :]
    spill = (sh + W) > 32
    hi = tl.where(spill[None, :], code >> ((32 - sh) & 31)[None, :], 0)
    widx = tl.arange(0, NW)
    c = tl.where(wi[None, :, None] == widx[None, None, :], lo[:, :, None], 0)
    c = c | tl.where(((wi + 1)[None, :, None] == widx[None, None, :]) & spill[None, :, None], hi[:, :, None], 0)
    return words | tl.reduce(c, 1, _or)


@triton.jit
def _store_words(words, dst_ptr, row_mask, NBYTES: tl.constexpr, NW: tl.constexpr):
    """Store the first ``NBYTES`` little-endian bytes of each row of ``words`` ``[R, NW]`` to ``dst_ptr`` ``[R]``."""
    byt = (words[:, :, None] >> (tl.arange(0, 4) * 8)[None, None, :]) & 0xFF
    byt = tl.reshape(byt, [words.shape[0], NW * 4])
    col = tl.arange(0, NW * 4)
    tl.store(dst_ptr[:, None] + col[None, :], byt.to(tl.uint8), mask=row_mask[:, None] & (col < NBYTES)[None, :])


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _encode_kernel(
    k_ptr, v_ptr, stride_kw, stride_kp, stride_vw, stride_vp,
    page_ids_ptr, page_lens_ptr,
    kc_ptr, kr_ptr, km_ptr, vc_ptr, vs_ptr, vz_ptr, thr_ptr,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, ROWS: tl.constexpr, NUM_LEVELS: tl.constexpr,
    LB1: tl.constexpr, LB2: tl.constexpr, LB3: tl.constexpr, LB4: tl.constexpr,
    LB5: tl.constexpr, LB6: tl.constexpr, LB7: tl.constexpr, LB8: tl.constexpr,
    LO1: tl.constexpr, LO2: tl.constexpr, LO3: tl.constexpr, LO4: tl.constexpr,
    LO5: tl.constexpr, LO6: tl.constexpr, LO7: tl.constexpr, LO8: tl.constexpr,
    LT1: tl.constexpr, LT2: tl.constexpr, LT3: tl.constexpr, LT4: tl.constexpr,
    LT5: tl.constexpr, LT6: tl.constexpr, LT7: tl.constexpr, LT8: tl.constexpr,
    KB: tl.constexpr, NWK: tl.constexpr, VBITS: tl.constexpr, VGROUP: tl.constexpr, VB: tl.constexpr,
    NVG: tl.constexpr, NWV: tl.constexpr, HAS_MEAN: tl.constexpr,
):
    w = tl.program_id(0)
    page = tl.load(page_ids_ptr + w).to(tl.int64)
    n = tl.load(page_lens_ptr + w)
    w64 = w.to(tl.int64)
    cols = tl.arange(0, HEAD_DIM)
    rows0 = tl.arange(0, ROWS)
    N1: tl.constexpr = HEAD_DIM // 2

    # ---- page mean of the rotated keys (first pass) ----
    mean = tl.zeros([HEAD_DIM], tl.float32)
    if HAS_MEAN:
        for r0 in range(0, n, ROWS):
            rows = r0 + rows0
            valid = rows < n
            y = tl.load(k_ptr + w64 * stride_kw + rows[:, None] * stride_kp + cols[None, :], mask=valid[:, None],
                        other=0.0).to(tl.float32)
            mean += tl.sum(y, 0)
        mean_bf = (mean / n.to(tl.float32)).to(tl.bfloat16)
        tl.store(km_ptr + page * HEAD_DIM + cols, mean_bf)
        mean = mean_bf.to(tl.float32)

    # ---- codes, radius, values (second pass) ----
    for r0 in range(0, n, ROWS):
        rows = r0 + rows0
        valid = rows < n
        tok = page * PAGE_SIZE + rows
        y = tl.load(k_ptr + w64 * stride_kw + rows[:, None] * stride_kp + cols[None, :], mask=valid[:, None],
                    other=0.0).to(tl.float32) - mean[None, :]
        xe, xo = tl.split(tl.reshape(y, [ROWS, N1, 2]))
        words = tl.zeros([ROWS, NWK], tl.int32)
        words = _pack_words(words, _bucket_circle(xe, xo, thr_ptr, LT1, LB1), LO1, N1, LB1, NWK)
        rho = tl.sqrt(xe * xe + xo * xo)
        a, bb = tl.split(tl.reshape(rho, [ROWS, HEAD_DIM >> 2, 2]))
        words = _pack_words(words, _bucket_quadrant(a, bb, thr_ptr, LT2, LB2), LO2, HEAD_DIM >> 2, LB2, NWK)
        rho = tl.sqrt(a * a + bb * bb)
        if NUM_LEVELS >= 3:
            a, bb = tl.split(tl.reshape(rho, [ROWS, HEAD_DIM >> 3, 2]))
            words = _pack_words(words, _bucket_quadrant(a, bb, thr_ptr, LT3, LB3), LO3, HEAD_DIM >> 3, LB3, NWK)
            rho = tl.sqrt(a * a + bb * bb)
        if NUM_LEVELS >= 4:
            a, bb = tl.split(tl.reshape(rho, [ROWS, HEAD_DIM >> 4, 2]))
            words = _pack_words(words, _bucket_quadrant(a, bb, thr_ptr, LT4, LB4), LO4, HEAD_DIM >> 4, LB4, NWK)
            rho = tl.sqrt(a * a + bb * bb)
        if NUM_LEVELS >= 5:
            a, bb = tl.split(tl.reshape(rho, [ROWS, HEAD_DIM >> 5, 2]))
            words = _pack_words(words, _bucket_quadrant(a, bb, thr_ptr, LT5, LB5), LO5, HEAD_DIM >> 5, LB5, NWK)
            rho = tl.sqrt(a * a + bb * bb)
        if NUM_LEVELS >= 6:
            a, bb = tl.split(tl.reshape(rho, [ROWS, HEAD_DIM >> 6, 2]))
            words = _pack_words(words, _bucket_quadrant(a, bb, thr_ptr, LT6, LB6), LO6, HEAD_DIM >> 6, LB6, NWK)
            rho = tl.sqrt(a * a + bb * bb)
        if NUM_LEVELS >= 7:
            a, bb = tl.split(tl.reshape(rho, [ROWS, HEAD_DIM >> 7, 2]))
            words = _pack_words(words, _bucket_quadrant(a, bb, thr_ptr, LT7, LB7), LO7, HEAD_DIM >> 7, LB7, NWK)
            rho = tl.sqrt(a * a + bb * bb)
        if NUM_LEVELS >= 8:
            a, bb = tl.split(tl.reshape(rho, [ROWS, HEAD_DIM >> 8, 2]))
            words = _pack_words(words, _bucket_quadrant(a, bb, thr_ptr, LT8, LB8), LO8, HEAD_DIM >> 8, LB8, NWK)
            rho = tl.sqrt(a * a + bb * bb)
        tl.store(kr_ptr + tok, tl.reshape(rho, [ROWS]).to(tl.float16), mask=valid)
        _store_words(words, kc_ptr + tok * KB, valid, KB, NWK)

        # values
        xv = tl.load(v_ptr + w64 * stride_vw + rows[:, None] * stride_vp + cols[None, :], mask=valid[:, None],
                     other=0.0).to(tl.float32)
        if VBITS == 16:
            v16 = vc_ptr.to(tl.pointer_type(tl.bfloat16))
            tl.store(v16 + tok[:, None] * HEAD_DIM + cols[None, :], xv.to(tl.bfloat16), mask=valid[:, None])
        else:
            gv = tl.reshape(xv, [ROWS, NVG, VGROUP])
            lo = tl.min(gv, 2)
            hi = tl.max(gv, 2)
            QMAX: tl.constexpr = (1 << VBITS) - 1
            scale = ((hi - lo) / QMAX).to(tl.float16)
            zero = lo.to(tl.float16)
            gidx = tl.arange(0, NVG)
            tl.store(vs_ptr + tok[:, None] * NVG + gidx[None, :], scale, mask=valid[:, None])
            tl.store(vz_ptr + tok[:, None] * NVG + gidx[None, :], zero, mask=valid[:, None])
            s = tl.maximum(scale.to(tl.float32), 1e-8)
            qf = (gv - zero.to(tl.float32)[:, :, None]) / s[:, :, None]
            q = tl.minimum(tl.maximum(_round_half_even(qf), 0.0), QMAX * 1.0).to(tl.int32)
            q = tl.reshape(q, [ROWS, HEAD_DIM])
            vrow = vc_ptr + tok * VB
            if (8 % VBITS) == 0:
                E: tl.constexpr = 8 // VBITS
                q3 = tl.reshape(q, [ROWS, HEAD_DIM // E, E]) << (tl.arange(0, E) * VBITS)[None, None, :]
                byt = tl.reduce(q3, 2, _or)
                tl.store(vrow[:, None] + tl.arange(0, HEAD_DIM // E)[None, :], byt.to(tl.uint8), mask=valid[:, None])
            else:
                vw = _pack_words(tl.zeros([ROWS, NWV], tl.int32), q, 0, HEAD_DIM, VBITS, NWV)
                _store_words(vw, vrow, valid, VB, NWV)
