// selective_state_update: one decode step of Mamba's SSM (math in ssm_math.h), mamba_ssm's contract.
// Mamba-1 layout: state (batch, dim, N), x/dt/z (batch, dim), A (dim, N), B/C (batch, N), D/dt_bias (dim,).
// Mamba-2 layout: state (batch, H, P, N), x/dt/z (batch, H, P), A (H, P, N), B/C (batch, G, N),
// D/dt_bias (H, P), with H % G == 0 and head h reading group h / (H / G).
// The front end views Mamba-1 as Mamba-2 with H = G = 1; the kernels see only the latter.
// Continuous batching: with state_batch_indices, batch element b updates state row indices[b] of a
// larger cache (−1: a padding element, whose state is untouched and whose out is zero). The indices are
// checked on the host except inside a CUDA graph capture, where the kernels treat any row outside the
// cache as padding.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace shammie::ssm {

struct StateUpdateArgs {
  int64_t batch, heads, dim, dstate, groups;
  bool softplus;
  at::Tensor state;    // (batch, H, P, N), any strides, updated in place
  at::Tensor x, dt;    // (batch, H, P), contiguous
  std::optional<at::Tensor> z;
  at::Tensor A;        // (H, P, N), contiguous, accumulation dtype
  at::Tensor B, C;     // (batch, G, N), contiguous
  at::Tensor D, dt_bias;  // (H, P), contiguous, accumulation dtype (zeros when not given)
  at::Tensor out;      // (batch, H, P), contiguous
  std::optional<at::Tensor> state_rows;  // (batch,) int64: each element's row of state (−1: padding)
};

using StateUpdateKernel = void (*)(const StateUpdateArgs&);

at::Tensor selective_state_update(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                  const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                  const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                  const std::optional<at::Tensor>& state_batch_indices, StateUpdateKernel kernel,
                                  bool values_on_host = true);

}  // namespace shammie::ssm
