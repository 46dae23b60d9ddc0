// selective_scan CUDA kernels for float inputs (and float64), and the CUDA registration.
#include "selective_scan/selective_scan_backward.cuh"
#include <torch/library.h>

namespace shammie::ssm::cuda {

void scan_forward_float(const ScanForwardArgs& args) {
  if (args.in.u.scalar_type() == at::kDouble) return scan_forward_cuda<double>(args);
  scan_forward_cuda<float>(args);
}

void scan_backward_float(const ScanBackwardArgs& args) {
  if (args.in.u.scalar_type() == at::kDouble) return scan_backward_cuda<double>(args);
  scan_backward_cuda<float>(args);
}

}  // namespace shammie::ssm::cuda

namespace {

using namespace shammie::ssm;

void forward_cuda(const ScanForwardArgs& a) {
  switch (a.in.u.scalar_type()) {
    case at::kHalf: return shammie::ssm::cuda::scan_forward_half(a);
    case at::kBFloat16: return shammie::ssm::cuda::scan_forward_bfloat16(a);
    default: return shammie::ssm::cuda::scan_forward_float(a);
  }
}

void backward_cuda(const ScanBackwardArgs& a) {
  // Deterministic under torch.use_deterministic_algorithms (selective_scan_deterministic.cuh).
  switch (a.in.u.scalar_type()) {
    case at::kHalf: return shammie::ssm::cuda::scan_backward_half(a);
    case at::kBFloat16: return shammie::ssm::cuda::scan_backward_bfloat16(a);
    default: return shammie::ssm::cuda::scan_backward_float(a);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(shammie, CUDA, m) {
  m.impl("selective_scan",
         [](const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
            const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
           return selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, forward_cuda);
         });
  m.impl("selective_scan_backward",
         [](const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_cp, const at::Tensor& u,
            const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
            const std::optional<at::Tensor>& delta_bias, const at::Tensor& checkpoints, bool delta_softplus) {
           return selective_scan_backward(grad_out, grad_cp, u, delta, A, B, C, D, z, delta_bias, checkpoints,
                                          delta_softplus, backward_cuda);
         });
}
