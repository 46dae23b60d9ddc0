// ssd_scan CUDA kernels for at::BFloat16 inputs (registered in ssd_scan_fp32.cu).
#include "ssd/ssd_scan_cuda.cuh"

namespace shammie::ssd::cuda {

void ssd_forward_bfloat16(const SsdForwardArgs& args) { ssd_forward_cuda<at::BFloat16>(args); }

void ssd_backward_bfloat16(const SsdBackwardArgs& args) { ssd_backward_cuda<at::BFloat16>(args); }

}  // namespace shammie::ssd::cuda
