// The ssd_scan and ssd_scan_backward schema functions bound to one device's kernels:
// ssd_scan.cpp registers them for CPU, ssd_scan_fp32.cu for CUDA.
#pragma once

#include <torch/library.h>

#include "ssd/ssd_scan.h"

namespace shammie::ssd {

template <SsdForwardKernel kForward, SsdBackwardKernel kBackward>
void register_kernels(torch::Library& m) {
  m.impl("ssd_scan", [](const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& dt_bias, const std::optional<at::Tensor>& initial_states,
                        bool dt_softplus, const std::optional<at::Tensor>& seq_idx,
                        const std::optional<at::Tensor>& cu_seqlens) {
    return ssd_scan_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, seq_idx, cu_seqlens,
                            kForward);
  });
  m.impl("ssd_scan_backward",
         [](const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final, const at::Tensor& x,
            const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
            const std::optional<at::Tensor>& dt_bias, const std::optional<at::Tensor>& initial_states,
            const at::Tensor& checkpoints, bool dt_softplus, const std::optional<at::Tensor>& seq_idx,
            const std::optional<at::Tensor>& cu_seqlens, const std::optional<at::Tensor>& grad_varlen) {
           return ssd_scan_backward(grad_out, grad_final, x, dt, A, B, C, D, z, dt_bias, initial_states, checkpoints,
                                    dt_softplus, seq_idx, cu_seqlens, grad_varlen, kBackward);
         });
}

}  // namespace shammie::ssd
