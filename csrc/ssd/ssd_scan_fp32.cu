// ssd_scan CUDA kernels for float inputs (and float64), and the CUDA registration of ssd_scan and
// ssd_scan_backward (Mamba-2's SSD scan, math in ssd_scan.h).
#include "ssd/ssd_scan_cuda.cuh"
#include "ssd/ssd_scan_registration.h"

#include <ATen/Context.h>

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
  // dB, dC, dA, dD and d(dt) are summed across blocks with float atomics.
  at::globalContext().alertNotDeterministic(
      "shammie::ssd_scan_backward with SHAMMIE_SSD_IMPL=kernel (CUDA; auto and chunked are deterministic)");
  switch (a.in.x.scalar_type()) {
    case at::kHalf: return shammie::ssd::cuda::ssd_backward_half(a);
    case at::kBFloat16: return shammie::ssd::cuda::ssd_backward_bfloat16(a);
    default: return shammie::ssd::cuda::ssd_backward_float(a);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(shammie, CUDA, m) { register_kernels<forward_cuda, backward_cuda>(m); }
