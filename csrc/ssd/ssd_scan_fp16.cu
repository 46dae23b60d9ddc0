// ssd_scan CUDA kernels for at::Half inputs (registered in ssd_scan_fp32.cu).
#include "ssd/ssd_scan_cuda.cuh"

namespace shammie::ssd::cuda {

void ssd_forward_half(const SsdForwardArgs& args) { ssd_forward_cuda<at::Half>(args); }

void ssd_backward_half(const SsdBackwardArgs& args) { ssd_backward_cuda<at::Half>(args); }

}  // namespace shammie::ssd::cuda
