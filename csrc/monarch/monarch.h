// Monarch (block-diagonal butterfly) product y = P_out · blockdiag(W2) · P · blockdiag(W1) · x.
// For each token x (length n = k·p):
//   u[i·q + a]  = Σ_j W1[i, a, j] · x[i·p + j]          (k blocks of q×p)
//   z_c[a]      = u[a·l + c]                             (the butterfly shuffle, c < l, a < r)
//   y[m·l + c]  = Σ_a W2[c, m, a] · z_c[a]               (l blocks of s×r)
// This header holds what the CPU and CUDA kernels share: the sizes, the index maps, and the
// front end (checks, reshapes, allocation) that both devices' registrations call.
#pragma once

#include <cstdint>
#include <tuple>

#include "common/host_device.h"

namespace shammie::monarch {

struct Dims {
  int64_t tokens;   // M: product of x's leading dims
  int64_t k, q, p;  // w1_bfly: (k, q, p)
  int64_t l, s, r;  // w2_bfly: (l, s, r)
  SHAMMIE_HD int64_t n() const { return k * p; }      // input width
  SHAMMIE_HD int64_t mid() const { return k * q; }    // width of u, = l·r
  SHAMMIE_HD int64_t out() const { return l * s; }    // output width
};

// Where z_c[a] lives in u, and where v_c[m] = (W2[c] z_c)[m] lands in y.
SHAMMIE_HD int64_t u_index_of_z(int64_t c, int64_t a, int64_t l) { return a * l + c; }
SHAMMIE_HD int64_t y_index_of_v(int64_t c, int64_t m, int64_t l) { return m * l + c; }

}  // namespace shammie::monarch

#include <ATen/core/Tensor.h>

namespace shammie::monarch {

// Inputs after the front end's checks: x as (M, n) with unit inner stride (rows may be strided),
// the weights contiguous, and the outputs allocated.
struct ForwardArgs {
  Dims dims;
  at::Tensor x;   // (M, n)
  at::Tensor w1;  // (k, q, p)
  at::Tensor w2;  // (l, s, r)
  at::Tensor y;   // (M, l·s), contiguous
};

struct BackwardArgs {
  Dims dims;
  at::Tensor grad_y;  // (M, l·s), unit inner stride
  at::Tensor x;       // (M, n), unit inner stride
  at::Tensor w1, w2;  // contiguous
  at::Tensor grad_x;  // (M, n), contiguous
  at::Tensor grad_w1, grad_w2;  // like w1, w2
};

// Three implementations: the fused kernels (monarch_cpu_kernels.cpp, monarch_forward.cu,
// monarch_backward.cu), two batched GEMMs with the shuffles as copies (monarch_gemm.cpp), and two
// plain GEMMs on the factors expanded to dense matrices, the shuffle inside the second (monarch_dense.cpp).
// SHAMMIE_MONARCH_IMPL=kernel|gemm|dense|auto picks one (auto: the batched GEMMs on CUDA from
// kGemmMinTokensCuda tokens up, the kernels otherwise; dense only when asked for until a GPU
// measures it, benchmarks/impl_compare.py).
enum class Impl { kKernel, kGemm, kDense };   // in SHAMMIE_MONARCH_IMPL's order of names
constexpr int64_t kGemmMinTokensCuda = 128;
Impl chosen_impl(const Dims& d, bool cuda);
void forward_gemm(const ForwardArgs& args);
void backward_gemm(const BackwardArgs& args);
void forward_dense(const ForwardArgs& args);
void backward_dense(const BackwardArgs& args);

using ForwardKernel = void (*)(const ForwardArgs&);
using BackwardKernel = void (*)(const BackwardArgs&);

// The device-independent halves of the ops; each device passes its kernel, which they call unless
// chosen_impl picks the GEMMs.
at::Tensor forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                   ForwardKernel kernel);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_y,
                                                        const at::Tensor& x, const at::Tensor& w1,
                                                        const at::Tensor& w2,
                                                        BackwardKernel kernel);

}  // namespace shammie::monarch
