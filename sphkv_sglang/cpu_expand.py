# SPDX-License-Identifier: Apache-2.0
"""Optional fused C++ expansion of coded keys and values for the CPU server (same results as
:class:`.planes.KeyPlanes` / :class:`.planes.ValuePlanes`).

Eager PyTorch spends most of a CPU decode step extracting the 63 packed angle fields of every
prefix key and running the polar recurrence through many small tensor ops. This module compiles
(once, with ``torch.utils.cpp_extension.load_inline``; cached under ``~/.cache/torch_extensions``)
a loop that does the same per key in registers: read the packed bytes, extract the fields, run the
recurrence top level first, add the page mean. The output is the transient rotated-domain key
``[H, N, d]`` float32 the reference attention multiplies with rotated queries.

:func:`load` returns ``None`` (and logs why) if no compiler is available or the build fails, or if
``SPHKV_CPU_KERNEL=0``; callers then use the pure-torch :class:`.planes.KeyPlanes`. Tests check
that both agree.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

__all__ = ["load", "FusedKeyExpander", "FusedValueExpander"]

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <cstdint>
#include <vector>

// codes [T, nbytes] uint8 (T = H*N rows), radius [T] float32, mean [T/page, d] float32,
// cos_sin [levels, max_n, 2] float32 (level 0 = level-1 angles), widths [F] int64 (level-1 fields first),
// sizes [levels] int64 (d/2, d/4, ..., 1). Returns [T, d] float32.
torch::Tensor expand_keys(torch::Tensor codes, torch::Tensor radius, torch::Tensor mean,
                          torch::Tensor cos_sin, torch::Tensor widths, torch::Tensor sizes,
                          int64_t page_size) {
  const int64_t T = codes.size(0), nbytes = codes.size(1), F = widths.size(0);
  const int64_t L = sizes.size(0), d = mean.size(1), max_n = cos_sin.size(1);
  auto out = torch::empty({T, d}, torch::kFloat32);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* rp = radius.data_ptr<float>();
  const float* mp = mean.data_ptr<float>();
  const float* cs = cos_sin.data_ptr<float>();
  const int64_t* wp = widths.data_ptr<int64_t>();
  const int64_t* sp = sizes.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  std::vector<int64_t> level_start(L);
  int64_t acc = 0;
  for (int64_t l = 0; l < L; ++l) { level_start[l] = acc; acc += sp[l]; }
  std::vector<int32_t> field(F);
  std::vector<float> a(d), b(d);
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* row = cp + t * nbytes;
    int64_t bit = 0;
    for (int64_t f = 0; f < F; ++f) {
      const int64_t w = wp[f], byte = bit >> 3, sh = bit & 7;
      uint32_t word = row[byte];
      if (byte + 1 < nbytes) word |= uint32_t(row[byte + 1]) << 8;
      field[f] = int32_t((word >> sh) & ((1u << w) - 1u));
      bit += w;
    }
    float* cur = a.data();
    float* nxt = b.data();
    cur[0] = rp[t];
    int64_t n = 1;
    for (int64_t l = L - 1; l >= 0; --l) {
      const int32_t* fl = field.data() + level_start[l];
      const float* tab = cs + l * max_n * 2;
      for (int64_t j = 0; j < n; ++j) {
        const float* c = tab + 2 * fl[j];
        nxt[2 * j] = cur[j] * c[0];
        nxt[2 * j + 1] = cur[j] * c[1];
      }
      std::swap(cur, nxt);
      n *= 2;
    }
    const float* m = mp + (t / page_size) * d;
    float* o = op + t * d;
    for (int64_t i = 0; i < d; ++i) o[i] = cur[i] + m[i];
  }
  return out;
}

// codes [T, nbytes] uint8 with d fields of `bits` bits, scale/zero [T, d/group] float32 -> [T, d] float32.
torch::Tensor expand_values(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero,
                            int64_t bits, int64_t group, int64_t d) {
  const int64_t T = codes.size(0), nbytes = codes.size(1), G = scale.size(1);
  auto out = torch::empty({T, d}, torch::kFloat32);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* row = cp + t * nbytes;
    float* o = op + t * d;
    int64_t bit = 0;
    for (int64_t i = 0; i < d; ++i, bit += bits) {
      const int64_t byte = bit >> 3, sh = bit & 7;
      uint32_t word = row[byte];
      if (byte + 1 < nbytes) word |= uint32_t(row[byte + 1]) << 8;
      const int64_t g = i / group;
      o[i] = zp[t * G + g] + float((word >> sh) & mask) * sp[t * G + g];
    }
  }
  return out;
}
"""

_lock = threading.Lock()
_module = None
_tried = False


def load():
    """The compiled extension module, or ``None`` when unavailable (logged once)."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("SPHKV_CPU_KERNEL", "1") == "0":
            logger.info("sphkv: fused CPU key expansion disabled (SPHKV_CPU_KERNEL=0); using pure-torch planes")
            return None
        try:
            from torch.utils.cpp_extension import load_inline

            _module = load_inline(name="sphkv_cpu_expand_v2", cpp_sources=_SOURCE, functions=["expand_keys", "expand_values"],
                                  extra_cflags=["-O3"], verbose=False)
            logger.info("sphkv: fused CPU key expansion compiled/loaded")
        except Exception as e:                                   # no compiler, no headers, build error
            logger.warning("sphkv: fused CPU key expansion unavailable (%s); using pure-torch planes", e)
            _module = None
        return _module


class FusedKeyExpander:
    """Same interface as :class:`.planes.KeyPlanes` ``.expand``, backed by the C++ loop."""

    def __init__(self, codec, module):
        self.module = module
        sizes = list(codec.sizes)
        max_n = max(c.numel() for c in codec.centers)
        cs = torch.zeros(len(sizes), max_n, 2)
        for lvl, c in enumerate(codec.centers):
            cs[lvl, :c.numel(), 0], cs[lvl, :c.numel(), 1] = torch.cos(c), torch.sin(c)
        self.cos_sin = cs.contiguous()
        self.widths = codec.widths.to(torch.int64).contiguous()
        self.sizes = torch.tensor(sizes, dtype=torch.int64)

    def expand(self, codes: torch.Tensor, radius: torch.Tensor, mean: torch.Tensor | None,
               page_size: int) -> torch.Tensor:
        h, n, nbytes = codes.shape
        d = int(self.sizes[0]) * 2
        if mean is None:
            mean = torch.zeros(h, max(1, n // page_size), d)
        out = self.module.expand_keys(codes.reshape(h * n, nbytes).contiguous(),
                                      radius.reshape(-1).to(torch.float32).contiguous(),
                                      mean.reshape(-1, d).to(torch.float32).contiguous(),
                                      self.cos_sin, self.widths, self.sizes, page_size)
        return out.view(h, n, d)


class FusedValueExpander:
    """Same interface as :class:`.planes.ValuePlanes` ``.expand``, backed by the C++ loop."""

    def __init__(self, vquant, module):
        self.vquant, self.module = vquant, module

    def expand(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        cfg = self.vquant.config
        if cfg.value_bits == 16:
            return codes.view(torch.bfloat16).to(torch.float32)
        h, n, nbytes = codes.shape
        out = self.module.expand_values(codes.reshape(h * n, nbytes).contiguous(),
                                        scale.reshape(h * n, -1).to(torch.float32).contiguous(),
                                        zero.reshape(h * n, -1).to(torch.float32).contiguous(),
                                        cfg.value_bits, cfg.value_group, cfg.head_dim)
        return out.view(h, n, cfg.head_dim)
