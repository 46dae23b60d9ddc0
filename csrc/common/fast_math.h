// Elementwise math written so that a loop over it vectorizes on the CPU (no calls into libm), shared
// by the CPU kernels; on the GPU it maps to the hardware's own functions.
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

}  // namespace shammie
