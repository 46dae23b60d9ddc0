// Elementwise math written so that a loop over it vectorizes on the CPU (no calls into libm), shared
// by the CPU kernels; on the GPU it maps to the hardware's own functions. vexp and vlog1p below.
//   vexp(x) for float: x = k·ln2 + r with |r| ≤ ln2/2, e^r by a degree-6 polynomial, times 2^k built
//   in the exponent bits. Relative error below 2e-7 (about 2 ulp) over the whole float range;
//   underflows to 0 below −87.3 and saturates above 88.37 (both far outside what SiLU or a softplus
//   discretization produce in practice). Doubles use std::exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <bit>

#include "common/host_device.h"

namespace shammie {

SHAMMIE_HD float vexp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // Branch-free, so a loop over it vectorizes (the kernels compile with -fno-trapping-math, which
  // lets GCC turn the compares into selects).
  const float keep = static_cast<float>(x >= -87.3f);   // 0 where e^x underflows
  x = std::min(std::max(x, -87.3f), 88.37f);
  // k = round(x / ln2), as the truncation of a positive number (biased by 128: x ≥ −87.3).
  const int32_t k = static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128;
  const float kf = static_cast<float>(k);
  const float r = (x - kf * 0.693145751953125f) - kf * 1.428606765330187e-06f;   // ln2 in two parts
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return keep * p * std::bit_cast<float>((k + 127) << 23);
#endif
}

SHAMMIE_HD double vexp(double x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}

// log1p(y) for y > −1, branch-free: u = 1 + y = m·2^e with m in [√½, √2), log m = 2·atanh(f),
// f = (m − 1)/(m + 1), by its series to f⁹ (|f| ≤ 0.172); then Goldberg's correction
// log1p(y) = log(u)·y/(u − 1) recovers the bits of y that rounding 1 + y lost. Relative error about
// 3e-7 on the float range.
SHAMMIE_HD float vlog1p(float y) {
#if defined(__CUDA_ARCH__)
  return log1pf(y);
#else
  const float u = 1.0f + y;
  const int32_t bits = std::bit_cast<int32_t>(u);
  // Exponent e and mantissa m, with m shifted into [√½, √2) (0x3f3504f3 is √½'s bit pattern).
  const int32_t shifted = bits - 0x3f3504f3;
  const int32_t e = shifted >> 23;
  const float m = std::bit_cast<float>((shifted & 0x007fffff) + 0x3f3504f3);
  const float f = (m - 1.0f) / (m + 1.0f);
  const float f2 = f * f;
  float series = 1.0f / 9.0f;
  series = series * f2 + 1.0f / 7.0f;
  series = series * f2 + 1.0f / 5.0f;
  series = series * f2 + 1.0f / 3.0f;
  series = series * f2 + 1.0f;
  const float log_u = static_cast<float>(e) * 0.693147180559945309f + 2.0f * f * series;
  const float denominator = u - 1.0f;
  const float exact = denominator != 0.0f ? y / denominator : 1.0f;   // u == 1: log1p(y) = y
  return denominator != 0.0f ? log_u * exact : y;
#endif
}

SHAMMIE_HD double vlog1p(double y) {
#if defined(__CUDA_ARCH__)
  return log1p(y);
#else
  return std::log1p(y);
#endif
}

}  // namespace shammie
