// Per-element math of Mamba's selective state space model, shared by the CPU and CUDA kernels:
//   dt = softplus(dt_raw + dt_bias) (or dt_raw + dt_bias),  softplus(v) = log1p(exp(v)), v for v > 20
//   h  = exp(dt · A) · h + dt · B · x
//   y  = Σ_n C[n] · h[n] + D · x,   out = y · silu(z) when z is given
#pragma once

#include <cmath>

#include "common/fast_math.h"
#include "common/host_device.h"

namespace shammie::ssm {

template <typename T>
SHAMMIE_HD T softplus(T v) {
#if defined(__CUDA_ARCH__)
  return v > T(20) ? v : log1p(exp(v));
#else
  return v > T(20) ? v : vlog1p(vexp(v));
#endif
}

template <typename T>
SHAMMIE_HD T step_size(T dt_raw, T dt_bias, bool use_softplus) {
  const T v = dt_raw + dt_bias;
  return use_softplus ? softplus(v) : v;
}

// One state update: h ← exp(dt·A)·h + dt·B·x.
template <typename T>
SHAMMIE_HD T state_step(T h, T dt, T a, T b, T x) { return vexp(dt * a) * h + dt * b * x; }

template <typename T>
SHAMMIE_HD T gate(T y, T z) { return y * (z / (T(1) + vexp(-z))); }

}  // namespace shammie::ssm
