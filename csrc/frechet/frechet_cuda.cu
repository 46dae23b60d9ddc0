// Fréchet / GEMM + bias + top-k CUDA kernels for float32 and float64 (FMA score tiles,
// frechet_cuda.cuh), and the CUDA registration.
#include <torch/library.h>

#include "frechet/frechet_cuda.cuh"

namespace shammie::frechet::cuda {

void topk_float(const Args& a) {
  if (a.x.scalar_type() == at::kDouble) return launch<double, double, double, false>(a);
  launch<float, float, float, false>(a);
}

}  // namespace shammie::frechet::cuda

namespace {

using namespace shammie::frechet;

void topk_cuda(const Args& a) {
  const auto t = a.x.scalar_type();
  if (t == at::kHalf || t == at::kBFloat16) return shammie::frechet::cuda::topk_half(a);
  shammie::frechet::cuda::topk_float(a);
}

}  // namespace

TORCH_LIBRARY_IMPL(shammie, CUDA, m) {
  m.impl("frechet_topk", [](const at::Tensor& p, const at::Tensor& d, int64_t k, const std::optional<at::Tensor>& c) {
    return frechet_topk(p, d, k, c, topk_cuda);
  });
  m.impl("gemm_bias_topk", [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t k,
                              const std::optional<at::Tensor>& c, bool largest) {
    return gemm_bias_topk(x, w, b, k, c, largest, topk_cuda);
  });
}
