# SPDX-License-Identifier: Apache-2.0
"""CPU kernels for paged attention over Spherical KV tier pages (C++, compiled once on first use).

The CPU counterpart of :func:`sphkv_kernels.decode.coded_decode_partial` /
:func:`~sphkv_kernels.decode.dense_decode_partial`, with the same arguments and outputs, plus a
multi-query form for extend (every new token of a request attends to the request's cached pages).
One pass per (request, kv head) row: for each of its pages, the keys are expanded from the angle
codes into a page-sized float32 tile (``page_size x head_dim``, cache resident) and values are
dequantized into another, logits for all queries of the row (GQA group x new tokens) come from that
tile, and an online softmax accumulates in float32. No dense copy of a prefix exists beyond one
page tile; nothing is written to the arenas.

Extend rows with many new tokens (``>= FLASH_MIN_TOKENS``, no soft cap) take the *flash route* instead
(``flash="float32"`` / ``"bfloat16"``, :data:`FLASH`): up to ``FLASH_PAGES`` (8) pages are expanded into
one token-major key/value tile (page means added to the keys), and ATen's CPU flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel SGLang's ``torch_native`` SDPA runs)
attends all of the row's queries — new tokens x GQA group, folded into the rows of one head — to it; the
tiles' (output, log-sum-exp) states merge in float32. Per-page logits cost 17.6 ms for 300 new tokens
over 24 coded 64-token pages (3 kv heads, 9 query heads, one thread), the flash route 9.8 ms (float32)
or 4.5 ms (bfloat16 tiles and queries; float32 accumulation) (``benchmarks/results/seam-cpu-path.json``). The tile is at most 8 pages: a
cache-sized block, never the whole prefix.

The source is compiled with ``torch.utils.cpp_extension.load_inline`` (cached under
``~/.cache/torch_extensions``, keyed by a hash of the source). :func:`load` returns ``None`` (logged
once) when no compiler is available or ``SPHKV_CPU_KERNEL=0``; callers then use the pure-PyTorch
references. Tests check the kernels against those references on random inputs.
"""
from __future__ import annotations

import os

import torch

from .cpu_build import InlineExtension
from .layout import CodedLayout

__all__ = ["load", "available", "coded_decode_partial_cpu", "dense_decode_partial_cpu", "coded_expand_cpu",
           "coded_prefix_attention_cpu", "dense_prefix_attention_cpu", "LOG2E"]

LOG2E = 1.4426950408889634

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

// Every page is processed "planar": token-minor arrays [.., P] so that the inner loops run over the
// page's tokens and vectorize (field extraction, the polar recurrence, logits, value dequantization).
namespace {

constexpr int64_t PROF_NO_KEYS = 1 << 16, PROF_NO_VALUES = 1 << 17;  // timing only
constexpr int64_t FLASH_PAGES = 8;                                   // pages per key tile of the flash route
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// 2**x for x <= 0 (softmax weights), vectorizable; relative error < 1e-8 + float rounding; -inf and x < -126 give 0.
#pragma omp declare simd
inline float exp2_neg(float x) {
  x = x < -126.f ? -126.f : x;
  const float xi = std::nearbyint(x);
  const float f = x - xi;                                  // [-0.5, 0.5]: Taylor of degree 7
  float p = 1.525273380e-05f;
  p = p * f + 1.540353039e-04f;
  p = p * f + 1.333355815e-03f;
  p = p * f + 9.618129108e-03f;
  p = p * f + 5.550410866e-02f;
  p = p * f + 2.402265070e-01f;
  p = p * f + 6.931471806e-01f;
  p = p * f + 1.000000000e+00f;
  const int32_t e = int32_t(xi) + 127;
  int32_t bits = e << 23;
  float scale; std::memcpy(&scale, &bits, 4);
  const float r = p * scale;
  return x <= -126.f ? 0.f : r;
}

// si[j] <- 2**(si[j] - mx) for j < n; returns the sum
inline float softmax_weights(float* si, int64_t n, float mx) {
  int64_t j = 0;
  float sum = 0.f;
#ifdef __AVX2__
  __m256 acc = _mm256_setzero_ps();
  const __m256 vmx = _mm256_set1_ps(mx), lo = _mm256_set1_ps(-126.f);
  const float c[8] = {1.525273380e-05f, 1.540353039e-04f, 1.333355815e-03f, 9.618129108e-03f,
                      5.550410866e-02f, 2.402265070e-01f, 6.931471806e-01f, 1.0f};
  for (; j + 8 <= n; j += 8) {
    __m256 x = _mm256_sub_ps(_mm256_loadu_ps(si + j), vmx);
    const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LE_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 xi = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, xi);
    __m256 p = _mm256_set1_ps(c[0]);
    for (int k = 1; k < 8; ++k) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c[k]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(xi), _mm256_set1_epi32(127)), 23);
    __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    r = _mm256_andnot_ps(tiny, r);
    _mm256_storeu_ps(si + j, r);
    acc = _mm256_add_ps(acc, r);
  }
  float buf[8]; _mm256_storeu_ps(buf, acc);
  for (int k = 0; k < 8; ++k) sum += buf[k];
#endif
  for (; j < n; ++j) { const float p = exp2_neg(si[j] - mx); si[j] = p; sum += p; }
  return sum;
}

inline float dotf(const float* a, const float* b, int64_t n) {
  int64_t j = 0;
  float sum = 0.f;
#ifdef __AVX2__
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
  float buf[8]; _mm256_storeu_ps(buf, acc);
  for (int k = 0; k < 8; ++k) sum += buf[k];
#endif
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

struct Scratch {
  std::vector<uint16_t> pl;      // byte planes [(bytes + 1) * P]
  std::vector<float> a, b;       // [d * P] recurrence buffers (planar keys end in one of them)
  std::vector<float> V;          // [d * P] planar values
  std::vector<float> zs, ss;     // [groups * P]
  Scratch(int64_t d, int64_t P, int64_t bytes, int64_t groups)
      : pl((bytes + 2) * P), a(d * P), b(d * P), V(d * P), zs((groups + 1) * P), ss((groups + 1) * P) {}
};

struct CodedSrc {
  const uint8_t* kc; int64_t kb;
  const at::Half* kr;
  const at::BFloat16* km;
  const uint8_t* vc; int64_t vb;
  const at::Half* vs; const at::Half* vz; int64_t nvg;
  const float* cosT; const float* sinT;
  int L; int lb[8]; int lo[8]; int lt[8];
  int vbits, vgroup; bool has_mean;
  int64_t P, d;
  int64_t bytes() const { return std::max(kb, vb); }
  int64_t groups() const { return nvg; }

  static void planes(const uint8_t* src, int64_t nbytes, int64_t n, int64_t P, uint16_t* pl) {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < nbytes; ++c) pl[c * P + t] = src[t * nbytes + c];
    for (int64_t t = n; t < P; ++t)
      for (int64_t c = 0; c < nbytes; ++c) pl[c * P + t] = 0;
    for (int64_t t = 0; t < P; ++t) pl[nbytes * P + t] = 0;
  }

  // planar keys [d, P] float32 (rotated domain, WITHOUT the page mean); returns the buffer; mean [d] or null
  const float* keys(int64_t page, int64_t n, Scratch& s, const at::BFloat16** mean) const {
    uint16_t* pl = s.pl.data();
    planes(kc + page * P * kb, kb, n, P, pl);
    float* cur = s.a.data(); float* nxt = s.b.data();
    const at::Half* r = kr + page * P;
    for (int64_t t = 0; t < n; ++t) cur[t] = static_cast<float>(r[t]);
    for (int64_t t = n; t < P; ++t) cur[t] = 0.f;
    int64_t nn = 1;
    for (int l = L - 1; l >= 0; --l) {
      const int bits = lb[l];
      const uint32_t mask = (1u << bits) - 1u;
      const float* ct = cosT + lt[l];
      const float* st = sinT + lt[l];
      // write children of node j at 2j, 2j+1: go from the last node down so `cur` may alias nothing
      for (int64_t j = 0; j < nn; ++j) {
        const int64_t bit = lo[l] + j * bits, byte = bit >> 3, sh = bit & 7;
        const uint16_t* p0 = pl + byte * P;
        const uint16_t* p1 = pl + (byte + 1) * P;
        const float* cj = cur + j * P;
        float* n0 = nxt + (2 * j) * P;
        float* n1 = nxt + (2 * j + 1) * P;
        int64_t t0 = 0;
#ifdef __AVX2__
        const __m128i shv = _mm_cvtsi32_si128(int(sh));
        const __m256i mk = _mm256_set1_epi32(int(mask));
        if (bits <= 4) {                                  // 16-entry tables live in two registers each
          const __m256 c_lo = _mm256_loadu_ps(ct), c_hi = _mm256_loadu_ps(ct + 8);
          const __m256 s_lo = _mm256_loadu_ps(st), s_hi = _mm256_loadu_ps(st + 8);
          const __m256i seven = _mm256_set1_epi32(7);
          for (; t0 + 8 <= P; t0 += 8) {
            const __m256i w0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p0 + t0)));
            const __m256i w1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p1 + t0)));
            const __m256i code = _mm256_and_si256(_mm256_srl_epi32(_mm256_or_si256(w0, _mm256_slli_epi32(w1, 8)), shv), mk);
            const __m256 hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(code, seven));
            const __m256 cv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(c_lo, code), _mm256_permutevar8x32_ps(c_hi, code), hi);
            const __m256 sv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(s_lo, code), _mm256_permutevar8x32_ps(s_hi, code), hi);
            const __m256 r = _mm256_loadu_ps(cj + t0);
            _mm256_storeu_ps(n0 + t0, _mm256_mul_ps(r, cv));
            _mm256_storeu_ps(n1 + t0, _mm256_mul_ps(r, sv));
          }
        } else {
          for (; t0 + 8 <= P; t0 += 8) {
            const __m256i w0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p0 + t0)));
            const __m256i w1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p1 + t0)));
            const __m256i code = _mm256_and_si256(_mm256_srl_epi32(_mm256_or_si256(w0, _mm256_slli_epi32(w1, 8)), shv), mk);
            const __m256 r = _mm256_loadu_ps(cj + t0);
            _mm256_storeu_ps(n0 + t0, _mm256_mul_ps(r, _mm256_i32gather_ps(ct, code, 4)));
            _mm256_storeu_ps(n1 + t0, _mm256_mul_ps(r, _mm256_i32gather_ps(st, code, 4)));
          }
        }
#endif
        for (int64_t t = t0; t < P; ++t) {
          const uint32_t code = ((uint32_t(p0[t]) | (uint32_t(p1[t]) << 8)) >> sh) & mask;
          n0[t] = cj[t] * ct[code];
          n1[t] = cj[t] * st[code];
        }
      }
      std::swap(cur, nxt);
      nn *= 2;
    }
    *mean = has_mean ? km + page * d : nullptr;
    return cur;
  }

  // planar values [d, P] float32 in the storage domain (tokens >= n are zero)
  const float* values(int64_t page, int64_t n, Scratch& s) const {
    float* V = s.V.data();
    if (vbits == 16) {
      for (int64_t t = 0; t < n; ++t) {
        const uint8_t* src = vc + (page * P + t) * vb;
        for (int64_t i = 0; i < d; ++i) {
          uint16_t u; std::memcpy(&u, src + 2 * i, 2);
          uint32_t w = uint32_t(u) << 16; float f; std::memcpy(&f, &w, 4); V[i * P + t] = f;
        }
      }
      for (int64_t i = 0; i < d; ++i) for (int64_t t = n; t < P; ++t) V[i * P + t] = 0.f;
      return V;
    }
    uint16_t* pl = s.pl.data();
    planes(vc + page * P * vb, vb, n, P, pl);
    float* zs = s.zs.data(); float* ss = s.ss.data();
    const at::Half* sc = vs + page * P * nvg;
    const at::Half* zz = vz + page * P * nvg;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t g = 0; g < nvg; ++g) { ss[g * P + t] = static_cast<float>(sc[t * nvg + g]);
                                          zs[g * P + t] = static_cast<float>(zz[t * nvg + g]); }
    for (int64_t g = 0; g < nvg; ++g) for (int64_t t = n; t < P; ++t) { ss[g * P + t] = 0.f; zs[g * P + t] = 0.f; }
    const uint32_t mask = (1u << vbits) - 1u;
    for (int64_t i = 0; i < d; ++i) {
      const int64_t bit = i * vbits, byte = bit >> 3, sh = bit & 7, g = i / vgroup;
      const uint16_t* p0 = pl + byte * P;
      const uint16_t* p1 = pl + (byte + 1) * P;
      const float* sg = ss + g * P;
      const float* zg = zs + g * P;
      float* o = V + i * P;
#pragma omp simd
      for (int64_t t = 0; t < P; ++t) {
        const uint32_t code = ((uint32_t(p0[t]) | (uint32_t(p1[t]) << 8)) >> sh) & mask;
        o[t] = zg[t] + float(code) * sg[t];
      }
    }
    return V;
  }
};

template <typename T>
struct DenseSrc {
  const T* k; const T* v; int64_t P, d;
  int64_t bytes() const { return 1; }
  int64_t groups() const { return 1; }
  const float* keys(int64_t page, int64_t n, Scratch& s, const at::BFloat16** mean) const {
    float* K = s.a.data();
    const T* src = k + page * P * d;
    for (int64_t t = 0; t < n; ++t) for (int64_t i = 0; i < d; ++i) K[i * P + t] = static_cast<float>(src[t * d + i]);
    for (int64_t i = 0; i < d; ++i) for (int64_t t = n; t < P; ++t) K[i * P + t] = 0.f;
    *mean = nullptr;
    return K;
  }
  const float* values(int64_t page, int64_t n, Scratch& s) const {
    float* V = s.V.data();
    const T* src = v + page * P * d;
    for (int64_t t = 0; t < n; ++t) for (int64_t i = 0; i < d; ++i) V[i * P + t] = static_cast<float>(src[t * d + i]);
    for (int64_t i = 0; i < d; ++i) for (int64_t t = n; t < P; ++t) V[i * P + t] = 0.f;
    return V;
  }
};

// items [W, 6] int64: (q_tok_start, q_tok_count, kv_head, entry_start, entry_end, out_slot).
// mode 0: out_o [S, G, d], out_lse [S, G] at out_slot (q_tok_count must be 1);
// mode 1: out_o [Nq, Hq, d], out_lse [Nq, Hq] at the queries' own positions.
// mode 2: as mode 1, but merged (online softmax) into the state already there (lse -inf = empty), after
//         multiplying the normalized output by vr [d, d] when given (value rotation back to storage domain).
template <typename Src>
void attend(const Src& src, const torch::Tensor& q, const torch::Tensor& items, const torch::Tensor& page_ids,
            const torch::Tensor& page_lens, torch::Tensor& out_o, torch::Tensor& out_lse,
            const c10::optional<torch::Tensor>& logits, int64_t num_kv_heads, double scale_log2, double soft_cap,
            int64_t mode, int64_t mm_threshold, const float* vr = nullptr, int64_t flash = 0) {
  const int64_t Hq = q.size(1), d = q.size(2), G = Hq / num_kv_heads, P = src.P;
  const int64_t W = items.size(0);
  const float* qp = q.data_ptr<float>();
  const int64_t* it = items.data_ptr<int64_t>();
  const int32_t* pid = page_ids.data_ptr<int32_t>();
  const int32_t* plen = page_lens.data_ptr<int32_t>();
  float* op = out_o.data_ptr<float>();
  float* lp = out_lse.data_ptr<float>();
  float* lg = (logits.has_value() && logits->defined()) ? logits->data_ptr<float>() : nullptr;
  const float sc = static_cast<float>(scale_log2);
  at::parallel_for(0, W, 1, [&](int64_t w0, int64_t w1) {
    Scratch scr(d, P, src.bytes(), src.groups());
    std::vector<float> Qb, S, m, l, acc, qmu, ot(d), orot(d);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t* iw = it + w * 6;
      const int64_t t0 = iw[0], T = iw[1], h = iw[2], e0 = iw[3], e1 = iw[4], slot = iw[5];
      const int64_t M = T * G;
      if (M == 0) continue;
      Qb.assign(M * d, 0.f); S.assign(M * P, 0.f); m.assign(M, NEG_INF); l.assign(M, 0.f); acc.assign(M * d, 0.f);
      qmu.assign(M, 0.f);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g) {
          const float* qs = qp + ((t0 + t) * Hq + h * G + g) * d;
          float* qd = Qb.data() + (t * G + g) * d;
          for (int64_t i = 0; i < d; ++i) qd[i] = qs[i] * sc;
        }
      // Flash route (extend, modes 1-2, no soft cap): up to FLASH_PAGES pages at a time are expanded into a token-major
      // tile [n, d] (keys with their page mean added, values in the storage domain) and ATen's CPU flash-attention
      // kernel attends all M = T * G rows of the item (GQA group folded into rows: one kv head) to it, in float32 or
      // bfloat16 (flash & 0xff = 1 / 2); the tiles' (output, log-sum-exp) states merge into (acc, m) here.
      const int64_t fdt = flash & 0xff, fmin = flash >> 8;
      if (fdt != 0 && mode != 0 && soft_cap == 0 && lg == nullptr && T >= fmin) {
        const auto st = fdt == 2 ? torch::kBFloat16 : torch::kFloat32;
        const double sm = scale_log2 / 1.4426950408889634;
        torch::Tensor Qf = torch::empty({1, 1, M, d}, torch::kFloat32);
        float* qf = Qf.data_ptr<float>();
        for (int64_t t = 0; t < T; ++t)
          std::memcpy(qf + t * G * d, qp + ((t0 + t) * Hq + h * G) * d, sizeof(float) * G * d);
        const torch::Tensor Qc = fdt == 2 ? Qf.to(st) : Qf;
        torch::Tensor Kt = torch::empty({FLASH_PAGES * P, d}, torch::kFloat32);
        torch::Tensor Vt = torch::empty({FLASH_PAGES * P, d}, torch::kFloat32);
        float* kt = Kt.data_ptr<float>();
        float* vt = Vt.data_ptr<float>();
        for (int64_t e = e0; e < e1;) {
          int64_t n = 0, pages = 0;
          for (; e < e1 && pages < FLASH_PAGES; ++e) {
            const int64_t page = pid[e], np = plen[e];
            if (np <= 0) continue;
            const at::BFloat16* mean = nullptr;
            const float* K = src.keys(page, np, scr, &mean);                               // [d, P] planar
            for (int64_t x = 0; x < d; ++x) {
              const float mu = mean != nullptr ? static_cast<float>(mean[x]) : 0.f;
              const float* kx = K + x * P;
              for (int64_t t = 0; t < np; ++t) kt[(n + t) * d + x] = kx[t] + mu;
            }
            const float* V = src.values(page, np, scr);
            for (int64_t x = 0; x < d; ++x) {
              const float* vx = V + x * P;
              for (int64_t t = 0; t < np; ++t) vt[(n + t) * d + x] = vx[t];
            }
            n += np; ++pages;
          }
          if (n == 0) continue;
          auto Kc = Kt.narrow(0, 0, n).view({1, 1, n, d});
          auto Vc = Vt.narrow(0, 0, n).view({1, 1, n, d});
          if (fdt == 2) { Kc = Kc.to(st); Vc = Vc.to(st); }
          auto res = at::_scaled_dot_product_flash_attention_for_cpu(Qc, Kc, Vc, 0.0, false, c10::nullopt, sm);
          const torch::Tensor oc = std::get<0>(res).to(torch::kFloat32).contiguous();
          const torch::Tensor lc = std::get<1>(res).to(torch::kFloat32).contiguous();
          const float* ocp = oc.data_ptr<float>();
          const float* lcp = lc.data_ptr<float>();
          for (int64_t i = 0; i < M; ++i) {
            const float lt = lcp[i] * 1.4426950408889634f;
            float* ai = acc.data() + i * d;
            const float* oi = ocp + i * d;
            if (m[i] == NEG_INF) {
              for (int64_t x = 0; x < d; ++x) ai[x] = oi[x];
              m[i] = lt;
            } else {
              const float mx = std::max(m[i], lt), wa = std::exp2(m[i] - mx), wb = std::exp2(lt - mx), sw = wa + wb;
              const float is = 1.f / sw;
              for (int64_t x = 0; x < d; ++x) ai[x] = (ai[x] * wa + oi[x] * wb) * is;
              m[i] = mx + std::log2(sw);
            }
          }
        }
        for (int64_t i = 0; i < M; ++i) l[i] = m[i] == NEG_INF ? 0.f : 1.f;
      } else {
      const bool use_mm = M >= (mm_threshold & 0xffff);
      torch::Tensor Qt, At;
      if (use_mm) {
        Qt = torch::from_blob(Qb.data(), {M, d}, torch::kFloat32);
        At = torch::from_blob(acc.data(), {M, d}, torch::kFloat32);
      }
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t page = pid[e], n = plen[e];
        if (n <= 0) continue;
        const at::BFloat16* mean = nullptr;
        const float* K = (mm_threshold & PROF_NO_KEYS) ? scr.b.data() : src.keys(page, n, scr, &mean);      // [d, P]
        if (use_mm) {
          auto St = torch::from_blob(S.data(), {M, n}, torch::kFloat32);
          at::mm_out(St, Qt, torch::from_blob(const_cast<float*>(K), {d, n}, {P, 1}, torch::kFloat32));
        } else {
          for (int64_t i = 0; i < M; ++i) {
            float* si = S.data() + i * n;
            const float* qi = Qb.data() + i * d;
            for (int64_t t = 0; t < n; ++t) si[t] = 0.f;
            for (int64_t x = 0; x < d; ++x) {
              const float qx = qi[x];
              const float* kx = K + x * P;
#pragma omp simd
              for (int64_t t = 0; t < n; ++t) si[t] += qx * kx[t];
            }
          }
        }
        if (mean != nullptr) {
          for (int64_t i = 0; i < M; ++i) {
            const float* qi = Qb.data() + i * d;
            float mu = 0.f;
            for (int64_t x = 0; x < d; ++x) mu += qi[x] * static_cast<float>(mean[x]);
            float* si = S.data() + i * n;
            for (int64_t t = 0; t < n; ++t) si[t] += mu;
          }
        }
        if (soft_cap > 0) {                  // c * tanh(s / c) on the natural-scale logits (S is log2-scaled)
          const float c2 = float(soft_cap * 1.4426950408889634), inv = 1.f / c2;
          for (int64_t i = 0; i < M * n; ++i) S[i] = c2 * std::tanh(S[i] * inv);
        }
        if (lg != nullptr) {                 // mode 0 only: logits [entries * P, G]
          for (int64_t j = 0; j < n; ++j)
            for (int64_t g = 0; g < G; ++g) lg[(e * P + j) * G + g] = S[g * n + j];
        }
        const float* V = (mm_threshold & PROF_NO_VALUES) ? scr.V.data() : src.values(page, n, scr);          // [d, P]
        for (int64_t i = 0; i < M; ++i) {
          float* si = S.data() + i * n;
          float mx = m[i];
#pragma omp simd reduction(max:mx)
          for (int64_t j = 0; j < n; ++j) mx = std::max(mx, si[j]);
          const float alpha = std::exp2(m[i] - mx);
          const float sum = softmax_weights(si, n, mx);
          l[i] = l[i] * alpha + sum;
          m[i] = mx;
          float* ai = acc.data() + i * d;
          if (!use_mm) {
            for (int64_t x = 0; x < d; ++x) {
              const float* vx = V + x * P;
              ai[x] = ai[x] * alpha + dotf(si, vx, n);
            }
          } else {
            for (int64_t x = 0; x < d; ++x) ai[x] *= alpha;
          }
        }
        if (use_mm) {
          auto St = torch::from_blob(S.data(), {M, n}, torch::kFloat32);
          At.addmm_(St, torch::from_blob(const_cast<float*>(V), {n, d}, {1, P}, torch::kFloat32));
        }
      }
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t i = t * G + g;
          float* o; float* ls;
          if (mode == 0) { o = op + (slot * G + g) * d; ls = lp + slot * G + g; }
          else { o = op + ((t0 + t) * Hq + h * G + g) * d; ls = lp + (t0 + t) * Hq + h * G + g; }
          if (mode == 2) {
            if (!(l[i] > 0.f)) continue;                       // no keys here: the state stays as it is
            const float inv = 1.f / l[i];
            for (int64_t x = 0; x < d; ++x) ot[x] = acc[i * d + x] * inv;
            const float* r = ot.data();
            if (vr != nullptr) {
              for (int64_t y = 0; y < d; ++y) orot[y] = 0.f;
              for (int64_t x = 0; x < d; ++x) {
                const float a = ot[x];
                const float* vrx = vr + x * d;
#pragma omp simd
                for (int64_t y = 0; y < d; ++y) orot[y] += a * vrx[y];
              }
              r = orot.data();
            }
            const float lt = m[i] + std::log2(l[i]), lo = *ls;
            if (lo == NEG_INF) {
              for (int64_t x = 0; x < d; ++x) o[x] = r[x];
              *ls = lt;
            } else {
              const float mx = std::max(lo, lt), wa = std::exp2(lo - mx), wb = std::exp2(lt - mx), s = wa + wb;
              const float is = 1.f / s;
              for (int64_t x = 0; x < d; ++x) o[x] = (o[x] * wa + r[x] * wb) * is;
              *ls = mx + std::log2(s);
            }
            continue;
          }
          if (l[i] > 0.f) {
            const float inv = 1.f / l[i];
            for (int64_t x = 0; x < d; ++x) o[x] = acc[i * d + x] * inv;
            *ls = m[i] + std::log2(l[i]);
          } else {
            for (int64_t x = 0; x < d; ++x) o[x] = 0.f;
            *ls = NEG_INF;
          }
        }
    }
  });
}

}  // namespace

// a coded arena's pointers and layout constants; the (cos, sin) LUT split into two tables owned by ``tables``
static CodedSrc coded_src(int64_t d, const torch::Tensor& k_codes, const torch::Tensor& k_radius,
                          const torch::Tensor& k_mean, const torch::Tensor& v_codes, const torch::Tensor& v_scale,
                          const torch::Tensor& v_zero, const torch::Tensor& lut, const torch::Tensor& level_info,
                          int64_t vbits, int64_t vgroup, bool has_mean, std::vector<float>& tables) {
  CodedSrc s;
  s.P = k_codes.size(1); s.d = d; s.kb = k_codes.size(2); s.vb = v_codes.size(2);
  s.kc = k_codes.data_ptr<uint8_t>(); s.kr = k_radius.data_ptr<at::Half>(); s.km = k_mean.data_ptr<at::BFloat16>();
  s.vc = v_codes.data_ptr<uint8_t>(); s.vs = v_scale.data_ptr<at::Half>(); s.vz = v_zero.data_ptr<at::Half>();
  s.nvg = v_scale.size(2);
  const float* lp = lut.data_ptr<float>();           // [n, 2] (cos, sin) -> split tables
  const int64_t nl = lut.size(0);
  tables.assign(2 * nl, 0.f);
  for (int64_t i = 0; i < nl; ++i) { tables[i] = lp[2 * i]; tables[nl + i] = lp[2 * i + 1]; }
  s.cosT = tables.data(); s.sinT = tables.data() + nl;
  const int64_t* li = level_info.data_ptr<int64_t>();
  s.L = int(level_info.size(0));
  TORCH_CHECK(s.L <= 8, "unsupported layout");
  for (int l = 0; l < s.L; ++l) { s.lb[l] = int(li[3 * l]); s.lo[l] = int(li[3 * l + 1]); s.lt[l] = int(li[3 * l + 2]); }
  s.vbits = int(vbits); s.vgroup = int(vgroup); s.has_mean = has_mean;
  return s;
}

void coded_attend(torch::Tensor q, torch::Tensor items, torch::Tensor page_ids, torch::Tensor page_lens,
                  torch::Tensor out_o, torch::Tensor out_lse, c10::optional<torch::Tensor> logits,
                  torch::Tensor k_codes, torch::Tensor k_radius, torch::Tensor k_mean, torch::Tensor v_codes,
                  torch::Tensor v_scale, torch::Tensor v_zero, torch::Tensor lut, torch::Tensor level_info,
                  int64_t vbits, int64_t vgroup, bool has_mean, int64_t num_kv_heads, double scale_log2,
                  double soft_cap, int64_t mode, int64_t mm_threshold, c10::optional<torch::Tensor> vrot, int64_t flash) {
  std::vector<float> tables;
  const CodedSrc s = coded_src(q.size(2), k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, lut, level_info, vbits,
                               vgroup, has_mean, tables);
  const float* vr = nullptr;
  if (vrot.has_value() && vrot->defined()) {
    TORCH_CHECK(vrot->scalar_type() == torch::kFloat32 && vrot->is_contiguous() && vrot->numel() == s.d * s.d,
                "value rotation must be a contiguous float32 [d, d] tensor");
    vr = vrot->data_ptr<float>();
  }
  attend(s, q, items, page_ids, page_lens, out_o, out_lse, logits, num_kv_heads, scale_log2, soft_cap, mode, mm_threshold, vr,
         flash);
}

// Expand whole coded pages: k_out / v_out [n, P, d] float32 — keys in the rotated domain with the page mean added,
// values in the storage domain (tokens >= page_lens[i] are zero). Copy-on-write / demotion reads, not attention.
void coded_expand(torch::Tensor page_ids, torch::Tensor page_lens, torch::Tensor k_out, torch::Tensor v_out,
                  torch::Tensor k_codes, torch::Tensor k_radius, torch::Tensor k_mean, torch::Tensor v_codes,
                  torch::Tensor v_scale, torch::Tensor v_zero, torch::Tensor lut, torch::Tensor level_info,
                  int64_t vbits, int64_t vgroup, bool has_mean) {
  std::vector<float> tables;
  const CodedSrc s = coded_src(k_out.size(2), k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, lut, level_info,
                               vbits, vgroup, has_mean, tables);
  const int64_t n = page_ids.size(0), P = s.P, d = s.d;
  const int32_t* pid = page_ids.data_ptr<int32_t>();
  const int32_t* plen = page_lens.data_ptr<int32_t>();
  float* ko = k_out.data_ptr<float>();
  float* vo = v_out.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    Scratch scr(d, P, s.bytes(), s.groups());
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t np = plen[i];
      float* kd = ko + i * P * d;
      float* vd = vo + i * P * d;
      std::fill(kd, kd + P * d, 0.f);
      std::fill(vd, vd + P * d, 0.f);
      if (np <= 0) continue;
      const at::BFloat16* mean = nullptr;
      const float* K = s.keys(pid[i], np, scr, &mean);
      for (int64_t x = 0; x < d; ++x) {
        const float mu = mean != nullptr ? static_cast<float>(mean[x]) : 0.f;
        for (int64_t t = 0; t < np; ++t) kd[t * d + x] = K[x * P + t] + mu;
      }
      const float* V = s.values(pid[i], np, scr);
      for (int64_t x = 0; x < d; ++x)
        for (int64_t t = 0; t < np; ++t) vd[t * d + x] = V[x * P + t];
    }
  });
}

void dense_attend(torch::Tensor q, torch::Tensor items, torch::Tensor page_ids, torch::Tensor page_lens,
                  torch::Tensor out_o, torch::Tensor out_lse, c10::optional<torch::Tensor> logits,
                  torch::Tensor k_pages, torch::Tensor v_pages, int64_t num_kv_heads, double scale_log2,
                  double soft_cap, int64_t mode, int64_t mm_threshold, int64_t flash) {
  const int64_t P = k_pages.size(1), d = k_pages.size(2);
  if (k_pages.scalar_type() == torch::kBFloat16) {
    DenseSrc<at::BFloat16> s{k_pages.data_ptr<at::BFloat16>(), v_pages.data_ptr<at::BFloat16>(), P, d};
    attend(s, q, items, page_ids, page_lens, out_o, out_lse, logits, num_kv_heads, scale_log2, soft_cap, mode, mm_threshold, nullptr, flash);
  } else if (k_pages.scalar_type() == torch::kHalf) {
    DenseSrc<at::Half> s{k_pages.data_ptr<at::Half>(), v_pages.data_ptr<at::Half>(), P, d};
    attend(s, q, items, page_ids, page_lens, out_o, out_lse, logits, num_kv_heads, scale_log2, soft_cap, mode, mm_threshold, nullptr, flash);
  } else {
    TORCH_CHECK(k_pages.scalar_type() == torch::kFloat32, "dense pages must be bf16, fp16 or fp32");
    DenseSrc<float> s{k_pages.data_ptr<float>(), v_pages.data_ptr<float>(), P, d};
    attend(s, q, items, page_ids, page_lens, out_o, out_lse, logits, num_kv_heads, scale_log2, soft_cap, mode, mm_threshold, nullptr, flash);
  }
}
"""

_FLASH_CODES = {"off": 0, "float32": 1, "bfloat16": 2}
# extend (many queries per row): the flash route's tile dtype unless a call names one (SPHKV_CPU_FLASH)
FLASH = os.environ.get("SPHKV_CPU_FLASH", "float32")
FLASH_MIN_TOKENS = 16      # new tokens of an item from which the flash route is taken (fewer: the per-page route)


def _flash_code(flash: str | None) -> int:
    name = FLASH if flash is None else flash
    if name not in _FLASH_CODES:
        raise ValueError(f"flash={name!r} (SPHKV_CPU_FLASH?); allowed: {tuple(_FLASH_CODES)}")
    return _FLASH_CODES[name] | (FLASH_MIN_TOKENS << 8) if _FLASH_CODES[name] else 0


MM_THRESHOLD = 16          # queries per row from which the page tile products use ATen's matmul
_EXT = InlineExtension("sphkv_cpu_attn", _SOURCE, ("coded_attend", "dense_attend", "coded_expand"),
                       ("-O3", "-march=native", "-mprefer-vector-width=256", "-fopenmp-simd"),
                       "CPU attention kernel")


def load():
    """The compiled extension, or ``None`` when unavailable (no compiler, build error, ``SPHKV_CPU_KERNEL=0``)."""
    return _EXT.load()


def available() -> bool:
    """Whether the CPU kernels can run here (compiles on first call)."""
    return load() is not None


def _level_info(layout: CodedLayout) -> torch.Tensor:
    return torch.tensor([[b, o, t] for b, o, t in zip(layout.level_bits, layout.level_offsets, layout.lut_offsets)],
                        dtype=torch.int64)


_LEVEL_INFO: dict = {}


def _consts(layout: CodedLayout):
    key = id(layout)
    if key not in _LEVEL_INFO:
        _LEVEL_INFO[key] = (layout, _level_info(layout), layout.lut.contiguous())
    return _LEVEL_INFO[key][1:]


def decode_items(work: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Work items ``[W, 4]`` ``(row, start, end, slot)`` → kernel items ``[W, 6]`` int64 (one query per row)."""
    w = work.to(torch.int64)
    rows = w[:, 0]
    return torch.stack([rows // num_kv_heads, torch.ones_like(rows), rows % num_kv_heads, w[:, 1], w[:, 2], w[:, 3]],
                       1).contiguous()


def _check_cpu(*ts):
    for t in ts:
        if t is not None and t.device.type != "cpu":
            raise ValueError("the CPU kernels take CPU tensors")


def coded_decode_partial_cpu(q_rot, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, work, page_ids, page_lens,
                             part_o, part_lse, *, layout: CodedLayout, num_kv_heads: int, sm_scale: float,
                             logits=None, **_launch_options) -> None:
    """CPU :func:`sphkv_kernels.decode.coded_decode_partial` (same arguments; launch options ignored).

    q_rot ``[B, Hq, d]`` float32 (rotated by ``layout.key_rotation``); the arena tensors of a coded
    :class:`sphkv.pool.TierPool`; ``work`` ``[W, 4]`` int32 items ``(row, start, end, slot)``;
    ``page_ids`` / ``page_lens`` ``[n]`` int32; writes ``part_o`` ``[S, G, d]`` and ``part_lse``
    ``[S, G]`` (log2 domain) float32 at each item's slot and, when given, ``logits`` ``[n * P, G]``.
    """
    _check_cpu(q_rot, k_codes, work)
    if work.shape[0] == 0:
        return
    mod = load()
    li, lut = _consts(layout)
    mod.coded_attend(q_rot.contiguous().float(), decode_items(work, num_kv_heads), page_ids, page_lens, part_o,
                     part_lse, logits, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, lut, li,
                     layout.value_bits, layout.value_group, layout.has_mean, num_kv_heads,
                     float(sm_scale) * LOG2E, 0.0, 0, MM_THRESHOLD, None, 0)


def dense_decode_partial_cpu(q, k_pages, v_pages, work, page_ids, page_lens, part_o, part_lse, *, num_kv_heads: int,
                             sm_scale: float, logits=None, **_launch_options) -> None:
    """CPU :func:`sphkv_kernels.decode.dense_decode_partial` (same arguments; launch options ignored).

    q ``[B, Hq, d]`` (any float dtype); ``k_pages`` / ``v_pages`` ``[num_pages, P, d]`` bf16, fp16 or fp32.
    """
    _check_cpu(q, k_pages, work)
    if work.shape[0] == 0:
        return
    load().dense_attend(q.contiguous().float(), decode_items(work, num_kv_heads), page_ids, page_lens, part_o,
                        part_lse, logits, k_pages, v_pages, num_kv_heads, float(sm_scale) * LOG2E, 0.0, 0,
                        MM_THRESHOLD, 0)


def coded_prefix_attention_cpu(q_rot, k_codes, k_radius, k_mean, v_codes, v_scale, v_zero, items, page_ids,
                               page_lens, out, lse, *, layout: CodedLayout, num_kv_heads: int, sm_scale: float,
                               soft_cap: float = 0.0, merge: bool = False,
                               value_rotation: torch.Tensor | None = None, flash: str | None = None) -> None:
    """Many queries per row over one coded tier's pages (extend over a cached prefix).

    Parameters
    ----------
    q_rot : ``[N, Hq, d]`` float32 — the new tokens' queries, rotated by ``layout.key_rotation``.
    items : ``[R, 6]`` int64 — ``(first token, tokens, kv head, entry start, entry end, unused)``: the
        tokens ``first .. first + tokens - 1`` (query heads of the kv head's group) attend to the
        entries ``start .. end - 1`` of ``page_ids`` / ``page_lens`` (``[n]`` int32).
    out : ``[N, Hq, d]`` float32 — written for every query an item covers (storage domain of values);
    lse : ``[N, Hq]`` float32 — log2-domain log-sum-exp of the scaled logits (``-inf`` without keys).
    soft_cap : ``c > 0`` replaces every scaled logit ``s`` by ``c * tanh(s / c)`` (logit soft-capping).
    merge : instead of overwriting, merge this tier's state into the ``(out, lse)`` already there
        (``lse = -inf``: empty; queries without keys in this tier are left untouched) — one state
        accumulates over all tiers with no temporaries.
    value_rotation : ``[d, d]`` float32 — with ``merge``, the tier's normalized output is multiplied by
        it before merging (``layout.value_rotation``: back to the storage domain of the other tiers).
    flash : how items of ``>= FLASH_MIN_TOKENS`` tokens are computed (``None``: :data:`FLASH`): ``"off"`` — per
        page, logits from the page tile (ATen ``mm`` from ``MM_THRESHOLD`` rows); ``"float32"`` / ``"bfloat16"`` —
        ``FLASH_PAGES`` pages at a time are expanded into a token-major key/value tile (page means added) and
        ATen's CPU flash-attention kernel attends the item's rows (tokens x GQA group as rows of one head) to it in
        that dtype, float32 accumulation and log-sum-exp; the tiles' states are merged in float32. Soft-capped
        calls always take the per-page route.
    """
    _check_cpu(q_rot, k_codes, items)
    if value_rotation is not None and not merge:
        raise ValueError("value_rotation is applied only when merge=True")
    if items.shape[0] == 0:
        return
    li, lut = _consts(layout)
    load().coded_attend(q_rot, items, page_ids, page_lens, out, lse, None, k_codes, k_radius, k_mean, v_codes,
                        v_scale, v_zero, lut, li, layout.value_bits, layout.value_group, layout.has_mean,
                        num_kv_heads, float(sm_scale) * LOG2E, float(soft_cap), 2 if merge else 1, MM_THRESHOLD,
                        value_rotation, _flash_code(flash))


def coded_expand_cpu(pool, page_ids: torch.Tensor, page_lens: torch.Tensor, *, layout: CodedLayout):
    """Dense keys and values of coded pages, ``(k, v)`` ``[n, P, d]`` float32 in the original domain (tokens past
    ``page_lens[i]`` are zero): ``pool`` a coded :class:`sphkv.pool.TierPool` (CPU), ``page_ids`` / ``page_lens``
    ``[n]``. The C++ page expansion of the attention kernels, then the inverse rotations — what
    ``sphkv.pages.arenas``' ADA ``decode`` computes, for copy-on-write and demotion reads (not attention)."""
    _check_cpu(page_ids, pool.k_codes)
    n, P, d = page_ids.numel(), layout.page_size, layout.head_dim
    k = torch.empty(n, P, d)
    v = torch.empty(n, P, d)
    if n:
        li, lut = _consts(layout)
        load().coded_expand(page_ids.to(torch.int32).contiguous(), page_lens.to(torch.int32).contiguous(), k, v,
                            pool.k_codes, pool.k_radius, pool.k_mean, pool.v_codes, pool.v_scale, pool.v_zero, lut, li,
                            layout.value_bits, layout.value_group, layout.has_mean)
    k = k @ layout.key_rotation.to(torch.float32)
    if layout.value_rotation is not None:
        v = v @ layout.value_rotation.to(torch.float32)
    return k, v


def dense_prefix_attention_cpu(q, k_pages, v_pages, items, page_ids, page_lens, out, lse, *, num_kv_heads: int,
                               sm_scale: float, soft_cap: float = 0.0, merge: bool = False,
                               flash: str | None = None) -> None:
    """Dense-page form of :func:`coded_prefix_attention_cpu` (``q`` ``[N, Hq, d]`` float32, not rotated;
    ``merge`` and ``flash`` as there)."""
    _check_cpu(q, k_pages, items)
    if items.shape[0] == 0:
        return
    load().dense_attend(q, items, page_ids, page_lens, out, lse, None, k_pages, v_pages, num_kv_heads,
                        float(sm_scale) * LOG2E, float(soft_cap), 2 if merge else 1, MM_THRESHOLD, _flash_code(flash))
