// ssd_scan CUDA kernels for float inputs (and float64), and the CUDA registration of ssd_scan and
// ssd_scan_backward (Mamba-2's SSD scan, math in ssd_scan.h).
#include "ssd/ssd_scan_cuda.cuh"
#include <torch/library.h>

namespace shammie::ssd::cuda {

void ssd_forward_float(const SsdForwardArgs& args) {
  if (args.in.x.scalar_type() == at::kDouble) return ssd_forward_cuda<double>(args);
  ssd_forward_cuda<float>(args);
}

void ssd_backward_float(const SsdBackwardArgs& args) {
  if (args.in.x.scalar_type() == at::kDouble) return ssd_backward_cuda<double>(args);
  ssd_backward_cuda<float>(args);
}

}  // namespace shammie::ssd::cuda

namespace {

using namespace shammie::ssd;

void forward_cuda(const SsdForwardArgs& a) {
  switch (a.in.x.scalar_type()) {
    case at::kHalf: return shammie::ssd::cuda::ssd_forward_half(a);
    case at::kBFloat16: return shammie::ssd::cuda::ssd_forward_bfloat16(a);
    default: return shammie::ssd::cuda::ssd_forward_float(a);
  }
}

void backward_cuda(const SsdBackwardArgs& a) {
  switch (a.in.x.scalar_type()) {
    case at::kHalf: return shammie::ssd::cuda::ssd_backward_half(a);
    case at::kBFloat16: return shammie::ssd::cuda::ssd_backward_bfloat16(a);
    default: return shammie::ssd::cuda::ssd_backward_float(a);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(shammie, CUDA, m) {
  m.impl("ssd_scan",
         [](const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
            const std::optional<at::Tensor>& dt_bias, const std::optional<at::Tensor>& initial_states,
            bool dt_softplus) {
           return ssd_scan_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, forward_cuda);
         });
  m.impl("ssd_scan_backward",
         [](const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final, const at::Tensor& x,
            const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
            const std::optional<at::Tensor>& dt_bias, const std::optional<at::Tensor>& initial_states,
            const at::Tensor& checkpoints, bool dt_softplus) {
           return ssd_scan_backward(grad_out, grad_final, x, dt, A, B, C, D, z, dt_bias, initial_states, checkpoints,
                                    dt_softplus, backward_cuda);
         });
}
