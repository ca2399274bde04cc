# SPDX-License-Identifier: Apache-2.0
"""CPU page encoder (C++, compiled once on first use): the CPU form of :func:`sphkv_kernels.encode.encode_pages`.

Same arguments and outputs as the Triton launcher: whole or partial pages of keys/values → a coded tier's
arena (angle codes, fp16 radius, bf16 page mean, packed group-quantized values with fp16 scale/zero). The
rotations are one float32 GEMM each in PyTorch, exactly as the codec does; one C++ pass per page then
centres the keys on the page mean, runs the recursive polar transform, bucketizes every angle against the
codebook's decision thresholds, packs the fields, and quantizes and packs the values — instead of the
reference's ~40 tensor ops per call (atan2 / bucketize per level, two scatter_add packs), which dominated
the cost of coding a page on the CPU server.

Tolerance against the reference (:func:`~sphkv_kernels.encode.encode_pages_reference`), as for the Triton
kernel: the page mean is summed in another order (it may round to the neighbouring bf16 value), and
``atan2`` / ``sqrt`` are the C library's (an angle within float rounding of a decision threshold may land in
the neighbouring bin); everything else follows the reference's float32 operations (no FMA contraction,
round-half-to-even). Non-finite inputs are the caller's to handle (the SGLang store zeroes them first).
"""
from __future__ import annotations

import math

import torch

from sphkv.codebooks import thresholds

from .cpu_build import InlineExtension
from .layout import CodedLayout

__all__ = ["load", "available", "encode_pages_cpu"]


_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline void put_bits(uint8_t* dst, int64_t nbytes, int64_t off, uint32_t code) {
  const int64_t byte = off >> 3, sh = off & 7;
  const uint32_t w = code << sh;
  dst[byte] |= uint8_t(w & 0xff);
  if ((w >> 8) && byte + 1 < nbytes) dst[byte + 1] |= uint8_t(w >> 8);
}

// Bucketize by sign tests instead of atan2 (as the Triton kernel): the code of an angle is the number of decision
// thresholds t_k below it (torch.bucketize, right=False), counted branch-free over all thresholds (a binary search
// mispredicts on every step), vectorized across the level's angles. tc / ts: cos / sin of the thresholds.
// Level >= 2, angle = atan2(b, a) in [0, pi/2] with a, b >= 0: angle > t  <=>  b cos t - a sin t > 0.
inline void bucket_quarter(const float* tc, const float* ts, int64_t nt, const float* a, const float* b, int64_t n,
                           int32_t* cnt) {
  for (int64_t j = 0; j < n; ++j) cnt[j] = 0;
  for (int64_t k = 0; k < nt; ++k) {
    const float c = tc[k], s = ts[k];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) cnt[j] += int(b[j] * c - a[j] * s > 0.f);
  }
}
// Level 1, angle = atan2(o, e) mod 2 pi in [0, 2 pi): with up = (angle >= pi) and c = (sin(angle - t) > 0),
// angle > t  <=>  (t < pi) ? (up || c) : (up && c).
inline void bucket_circle(const float* tc, const float* ts, const uint8_t* tlow, int64_t nt, const float* e,
                          const float* o, int64_t n, int32_t* cnt) {
  for (int64_t j = 0; j < n; ++j) cnt[j] = 0;
  for (int64_t k = 0; k < nt; ++k) {
    const float c = tc[k], s = ts[k];
    if (tlow[k]) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const int up = int(o[j] < 0.f) | (int(o[j] == 0.f) & int(e[j] < 0.f));
        cnt[j] += up | int(o[j] * c - e[j] * s > 0.f);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const int up = int(o[j] < 0.f) | (int(o[j] == 0.f) & int(e[j] < 0.f));
        cnt[j] += up & int(o[j] * c - e[j] * s > 0.f);
      }
    }
  }
}
}  // namespace

// y [W, n_max, d] float32 rotated keys; vs [W, n_max, d] float32 values in the storage domain.
// thr_cos / thr_sin / thr_low: per level, cos and sin of the decision thresholds t and (t < pi), concatenated
// (level l at thr_off[l] .. thr_off[l + 1]); level_info [L, 2] (bits, bit offset).
void encode_pages_cpu(torch::Tensor y, torch::Tensor vs, torch::Tensor page_ids, torch::Tensor page_lens,
                      torch::Tensor k_codes, torch::Tensor k_radius, torch::Tensor k_mean, torch::Tensor v_codes,
                      torch::Tensor v_scale, torch::Tensor v_zero, torch::Tensor thr_cos, torch::Tensor thr_sin,
                      torch::Tensor thr_low, torch::Tensor thr_off,
                      torch::Tensor level_info, bool has_mean, int64_t vbits, int64_t vgroup) {
  const int64_t W = y.size(0), NM = y.size(1), d = y.size(2), P = k_codes.size(1);
  const int64_t kb = k_codes.size(2), vb = v_codes.size(2), L = level_info.size(0);
  const int64_t ng = vbits == 16 ? 0 : v_scale.size(2);
  const float* yp = y.data_ptr<float>();
  const float* vp = vs.data_ptr<float>();
  const int32_t* pid = page_ids.data_ptr<int32_t>();
  const int32_t* plen = page_lens.data_ptr<int32_t>();
  uint8_t* kc = k_codes.data_ptr<uint8_t>();
  at::Half* kr = k_radius.data_ptr<at::Half>();
  at::BFloat16* km = k_mean.data_ptr<at::BFloat16>();
  uint8_t* vc = v_codes.data_ptr<uint8_t>();
  at::Half* vsc = ng ? v_scale.data_ptr<at::Half>() : nullptr;
  at::Half* vz = ng ? v_zero.data_ptr<at::Half>() : nullptr;
  const float* tcos = thr_cos.data_ptr<float>();
  const float* tsin = thr_sin.data_ptr<float>();
  const uint8_t* tlow = thr_low.data_ptr<uint8_t>();
  const int64_t* to = thr_off.data_ptr<int64_t>();
  const int64_t* li = level_info.data_ptr<int64_t>();
  at::parallel_for(0, W, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> mean(d), x(d), rho(d), ev(d), od(d);
    std::vector<int32_t> cnt(d);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t n = plen[w], page = pid[w];
      const float* yw = yp + w * NM * d;
      // page mean (float32 sum, / count), stored in bf16; the keys are centred on the stored value
      if (has_mean) {
        std::fill(mean.begin(), mean.end(), 0.f);
        for (int64_t t = 0; t < n; ++t)
          for (int64_t i = 0; i < d; ++i) mean[i] += yw[t * d + i];
        const float cnt = float(n);
        for (int64_t i = 0; i < d; ++i) {
          const at::BFloat16 m = at::BFloat16(mean[i] / cnt);
          km[page * d + i] = m;
          mean[i] = static_cast<float>(m);
        }
      }
      for (int64_t t = 0; t < n; ++t) {
        const float* yt = yw + t * d;
        for (int64_t i = 0; i < d; ++i) x[i] = has_mean ? yt[i] - mean[i] : yt[i];
        uint8_t* code = kc + (page * P + t) * kb;
        std::memset(code, 0, kb);
        // level 1: pairs -> (rho, theta in [0, 2pi)); level l: pairs of radii -> (rho, psi in [0, pi/2])
        int64_t nn = d / 2;
        for (int64_t j = 0; j < nn; ++j) { ev[j] = x[2 * j]; od[j] = x[2 * j + 1]; }
        for (int64_t j = 0; j < nn; ++j) { const float ee = ev[j] * ev[j], oo = od[j] * od[j]; rho[j] = std::sqrt(ee + oo); }
        bucket_circle(tcos + to[0], tsin + to[0], tlow + to[0], to[1] - to[0], ev.data(), od.data(), nn, cnt.data());
        for (int64_t j = 0; j < nn; ++j) put_bits(code, kb, li[1] + j * li[0], uint32_t(cnt[j]));
        for (int64_t l = 1; l < L; ++l) {
          const int64_t bits = li[2 * l], off = li[2 * l + 1];
          nn /= 2;
          for (int64_t j = 0; j < nn; ++j) { ev[j] = rho[2 * j]; od[j] = rho[2 * j + 1]; }
          for (int64_t j = 0; j < nn; ++j) { const float aa = ev[j] * ev[j], bb = od[j] * od[j]; rho[j] = std::sqrt(aa + bb); }
          bucket_quarter(tcos + to[l], tsin + to[l], to[l + 1] - to[l], ev.data(), od.data(), nn, cnt.data());
          for (int64_t j = 0; j < nn; ++j) put_bits(code, kb, off + j * bits, uint32_t(cnt[j]));
        }
        kr[page * P + t] = at::Half(rho[0]);
        // values
        const float* vt = vp + (w * NM + t) * d;
        uint8_t* vcode = vc + (page * P + t) * vb;
        if (vbits == 16) {
          for (int64_t i = 0; i < d; ++i) {
            const at::BFloat16 b = at::BFloat16(vt[i]);
            std::memcpy(vcode + 2 * i, &b, 2);
          }
          continue;
        }
        std::memset(vcode, 0, vb);
        const float levels = float((1 << vbits) - 1);
        for (int64_t g = 0; g < ng; ++g) {
          const float* xg = vt + g * vgroup;
          float lo = xg[0], hi = xg[0];
          for (int64_t i = 1; i < vgroup; ++i) { lo = std::min(lo, xg[i]); hi = std::max(hi, xg[i]); }
          const at::Half sc = at::Half((hi - lo) / levels), zr = at::Half(lo);
          vsc[(page * P + t) * ng + g] = sc;
          vz[(page * P + t) * ng + g] = zr;
          const float s = std::max(static_cast<float>(sc), 1e-8f), z = static_cast<float>(zr);
          for (int64_t i = 0; i < vgroup; ++i) {
            float q = std::nearbyint((xg[i] - z) / s);
            q = std::min(std::max(q, 0.f), levels);
            put_bits(vcode, vb, (g * vgroup + i) * vbits, uint32_t(q));
          }
        }
      }
    }
  });
}
"""

# no FMA contraction: the polar transform's squares and sums round as the reference's separate ops
_EXT = InlineExtension("sphkv_cpu_encode", _SOURCE, ("encode_pages_cpu",),
                       ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp-simd"),
                       "CPU page encoder")


def load():
    """The compiled extension, or ``None`` when unavailable (no compiler, build error, ``SPHKV_CPU_KERNEL=0``)."""
    return _EXT.load()


def available() -> bool:
    """Whether the CPU encoder can run here (compiles on first call)."""
    return load() is not None


_CONSTS: dict = {}


def _consts(layout: CodedLayout):
    key = id(layout)
    if key not in _CONSTS:
        thr = [thresholds(c.double()) for c in layout.kcodec.centers]             # float64, as the Triton layout's
        off = torch.tensor([0] + [sum(t.numel() for t in thr[:i + 1]) for i in range(len(thr))], dtype=torch.int64)
        info = torch.tensor([[b, o] for b, o in zip(layout.level_bits, layout.level_offsets)], dtype=torch.int64)
        t = torch.cat(thr)
        _CONSTS[key] = (layout, torch.cos(t).float().contiguous(), torch.sin(t).float().contiguous(),
                        (t < math.pi).to(torch.uint8).contiguous(), off, info)
    return _CONSTS[key][1:]


def encode_pages_cpu(k, v, page_ids, page_lens, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, *,
                     layout: CodedLayout, rows=None, num_warps=None) -> None:
    """CPU :func:`sphkv_kernels.encode.encode_pages` (same arguments; ``rows`` / ``num_warps`` ignored).

    Parameters
    ----------
    k, v : ``[W, n_max, d]`` float (any float dtype) — keys (post-RoPE) and values of each page; rows
        ``>= page_lens[i]`` are ignored. Must be finite.
    page_ids : ``[W]`` int32 — destination pages in the tier arena; page_lens : ``[W]`` int32 in ``1..n_max``.
    k_codes, k_radius, k_mean, v_codes, v_scale, v_zero : the coded tier arena (CPU tensors, written in place).
    layout : :class:`~sphkv_kernels.layout.CodedLayout` of the arena's tier (built from codecs).
    """
    from .encode import _check

    w = _check(k, v, page_ids, page_lens, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, layout)
    for t in (k, v, k_codes):
        if t.device.type != "cpu":
            raise ValueError(f"encode_pages_cpu takes CPU tensors, got one on {t.device}")
    if layout.kcodec is None:
        raise ValueError("encode_pages_cpu needs a CodedLayout built from its codecs (CodedLayout.from_config)")
    if w == 0:
        return
    if page_lens.min() < 1 or page_lens.max() > k.shape[1]:
        raise ValueError(f"page_lens must be in 1..{k.shape[1]}, got {page_lens.tolist()}")
    tcos, tsin, tlow, off, info = _consts(layout)
    y = layout.kcodec.rotate(k).contiguous()                                   # [W, n, d] float32, as the codec
    vs = layout.vquant.to_storage_domain(v.to(torch.float32)).contiguous()
    load().encode_pages_cpu(y, vs, page_ids, page_lens, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, tcos, tsin, tlow,
                            off, info, layout.has_mean, layout.value_bits,
                            layout.value_group if layout.value_bits != 16 else layout.head_dim)
