// selective_scan CUDA kernels for at::BFloat16 inputs (registered in selective_scan_fp32.cu).
#include "selective_scan/selective_scan_backward.cuh"

namespace shammie::ssm::cuda {

void scan_forward_bfloat16(const ScanForwardArgs& args) { scan_forward_cuda<at::BFloat16>(args); }

void scan_backward_bfloat16(const ScanBackwardArgs& args) { scan_backward_cuda<at::BFloat16>(args); }

}  // namespace shammie::ssm::cuda
