// selective_scan: Mamba's selective scan over a whole sequence (math in ssm_math.h), mamba_ssm's
// selective_scan_fn contract. For each (batch b, channel d, state n) and t = 0..L−1:
//   dt_t = softplus(delta_t + delta_bias_d) (or without softplus)
//   h_t[n] = exp(dt_t·A[d,n])·h_{t−1}[n] + dt_t·B_t[n]·u_t,   h_{−1} = 0
//   y_t = Σ_n C_t[n]·h_t[n] + D_d·u_t,   out_t = y_t·silu(z_t) when z is given.
//
// The forward also returns the state at the end of every checkpoint interval of
// checkpoint_interval(N) steps (the last one is h_{L−1}, the "last state"). The backward starts from
// them, recomputing the states inside one interval at a time, in sub-chunks of kSubChunk steps,
// so it never holds (batch, dim, L, N). Backward sweep per interval, latest first:
//   G ← G + grad_checkpoint;  for t descending: G += C_t·dy_t;  (gradients of step t from G, h_{t−1});
//   G ← exp(dt_t·A)·G.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <type_traits>

#include "common/host_device.h"

namespace shammie::ssm {

constexpr int64_t kMaxDstate = 256;
constexpr int64_t kSubChunk = 32;

// Steps between saved states: 32 up to N = 16, growing with N so that the checkpoints stay at about
// 2 bytes per (channel, step) (half of a float32 u) for any N.
SHAMMIE_HD int64_t checkpoint_interval(int64_t dstate) { return kSubChunk * ((dstate + 15) / 16); }
SHAMMIE_HD int64_t num_checkpoints(int64_t seqlen, int64_t dstate) {
  const int64_t interval = checkpoint_interval(dstate);
  return seqlen == 0 ? 1 : (seqlen + interval - 1) / interval;
}

// What the kernels see, after the front end's checks and reshapes. B and C are float (double for
// float64 inputs) and time-major: variable ones (batch, groups, L, N), constant ones (dim, N).
struct ScanArgs {
  int64_t batch, dim, seqlen, dstate, groups;
  bool softplus, B_variable, C_variable;
  at::Tensor u, delta;              // (batch, dim, L), contiguous, input dtype
  std::optional<at::Tensor> z;      // (batch, dim, L), contiguous, input dtype
  at::Tensor A;                     // (dim, N), contiguous, accumulation dtype
  at::Tensor B, C;                  // see above, accumulation dtype
  at::Tensor D, delta_bias;         // (dim,), accumulation dtype (zeros when absent)
  at::Tensor checkpoints;           // (batch, dim, num_checkpoints, N), accumulation dtype
};

// Calls fn(std::bool_constant<B variable>, std::bool_constant<C variable>), so kernels are compiled
// once per form of B and C (shared by the CPU and CUDA launchers).
template <typename Fn>
void with_bc_forms(bool B_variable, bool C_variable, Fn&& fn) {
  if (B_variable && C_variable) fn(std::true_type{}, std::true_type{});
  else if (B_variable) fn(std::true_type{}, std::false_type{});
  else if (C_variable) fn(std::false_type{}, std::true_type{});
  else fn(std::false_type{}, std::false_type{});
}

struct ScanForwardArgs {
  ScanArgs in;
  at::Tensor out;                   // (batch, dim, L), contiguous, input dtype
};

struct ScanBackwardArgs {
  ScanArgs in;
  at::Tensor grad_out;              // (batch, dim, L), contiguous, input dtype
  std::optional<at::Tensor> grad_checkpoints;  // like checkpoints
  at::Tensor du, ddelta;            // (batch, dim, L), contiguous, input dtype
  std::optional<at::Tensor> dz;     // when z is given
  at::Tensor dA, dD, ddelta_bias;   // (dim, N), (dim,), (dim,), accumulation dtype, zero-filled
  at::Tensor dB, dC;                // like in.B / in.C, accumulation dtype, zero-filled
};

using ScanForwardKernel = void (*)(const ScanForwardArgs&);
using ScanBackwardKernel = void (*)(const ScanBackwardArgs&);

// Return (out, checkpoints).
std::tuple<at::Tensor, at::Tensor> selective_scan_forward(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus, ScanForwardKernel kernel);

// Return (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); dz is empty when z is absent.
std::vector<at::Tensor> selective_scan_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_checkpoints, const at::Tensor& u,
    const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, const at::Tensor& checkpoints, bool delta_softplus,
    ScanBackwardKernel kernel);

}  // namespace shammie::ssm
