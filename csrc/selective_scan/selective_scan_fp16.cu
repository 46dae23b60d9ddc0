// selective_scan CUDA kernels for at::Half inputs (registered in selective_scan_fp32.cu).
#include "selective_scan/selective_scan_backward.cuh"

namespace shammie::ssm::cuda {

void scan_forward_half(const ScanForwardArgs& args) { scan_forward_cuda<at::Half>(args); }

void scan_backward_half(const ScanBackwardArgs& args) { scan_backward_cuda<at::Half>(args); }

}  // namespace shammie::ssm::cuda
