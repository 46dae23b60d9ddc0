// Fréchet / GEMM + bias + top-k CUDA kernels for float16 and bfloat16: tensor-core (wmma) score
// tiles with fp32 accumulators (frechet_cuda.cuh).
#include "frechet/frechet_cuda.cuh"

namespace shammie::frechet::cuda {

void topk_half(const Args& a) {
  if (a.x.scalar_type() == at::kHalf) return launch<c10::Half, float, c10::Half, true>(a);
  launch<c10::BFloat16, float, c10::BFloat16, true>(a);
}

}  // namespace shammie::frechet::cuda
