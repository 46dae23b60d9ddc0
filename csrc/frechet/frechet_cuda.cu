// Fréchet / GEMM + bias + top-k CUDA kernels for float32 and float64 (FMA score tiles,
// frechet_cuda.cuh), the selection and merge of the GEMM implementation (frechet_gemm.cpp), and
// the CUDA registration.
#include <torch/library.h>

#include "frechet/frechet_cuda.cuh"

namespace shammie::frechet::cuda {

void topk_float(const Args& a) {
  if (a.x.scalar_type() == at::kDouble) return launch<double, double, double, false>(a);
  launch<float, float, float, false>(a);
}

namespace {

// Selection for the GEMM implementation (frechet_gemm.cpp). One warp per (row, segment of the
// block's columns): each lane keeps its own sorted list of kCap ≥ k entries over the columns it
// strides over (compile-time length and indices, so the list lives in registers), then k rounds of a
// warp-wide arg-best over the lanes' list heads write the segment's list in order; the lane whose
// head won drops it.
constexpr int kSelectWarps = 4;
constexpr int64_t kColsPerSegment = 2048;

template <typename acc_t, int kCap>
__global__ void __launch_bounds__(kSelectWarps * 32)
    select_kernel(const acc_t* __restrict__ scores, int64_t rows, int64_t cols,
                  const int64_t* __restrict__ col_labels, int64_t k, bool largest, int64_t segments,
                  int64_t batch, int64_t row0, int64_t group0, acc_t* keys, int64_t* labels) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r = int64_t(blockIdx.x) * kSelectWarps + warp;
  if (r >= rows) return;   // the whole warp leaves together
  const int64_t seg = blockIdx.y;
  acc_t lane_keys[kCap];
  int64_t lane_labels[kCap];
  SHAMMIE_UNROLL
  for (int i = 0; i < kCap; ++i) {
    lane_keys[i] = positive_infinity<acc_t>();
    lane_labels[i] = kNoLabel;
  }
  const int64_t c0 = seg * cols / segments, c1 = (seg + 1) * cols / segments;
  const acc_t* row = scores + r * cols;
  for (int64_t c = c0 + lane; c < c1; c += 32) {
    const acc_t v = row[c];
    insert_fixed(lane_keys, lane_labels, largest ? -v : v, col_labels[c]);
  }
  const int64_t at = ((group0 + seg) * batch + row0 + r) * k;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t head_label = lane_labels[0];
    acc_t best_key = lane_keys[0];
    int64_t best_label = head_label;
    for (int offset = 16; offset > 0; offset /= 2) {
      const acc_t other_key = __shfl_xor_sync(0xffffffffu, best_key, offset);
      const int64_t other_label = __shfl_xor_sync(0xffffffffu, best_label, offset);
      if (better(other_key, other_label, best_key, best_label)) {
        best_key = other_key;
        best_label = other_label;
      }
    }
    // Labels are unique, so exactly one lane's head won (none when every list is empty).
    if (best_label != kNoLabel && head_label == best_label) pop_front_fixed(lane_keys, lane_labels);
    if (lane == 0) {
      keys[at + i] = best_key;
      labels[at + i] = best_label;
    }
  }
}

int64_t cuda_segments(int64_t cols) {
  return std::clamp<int64_t>((cols + kColsPerSegment - 1) / kColsPerSegment, 1, 65535);
}

void cuda_select(const at::Tensor& scores, const at::Tensor& col_labels, int64_t row0, int64_t group0,
                 int64_t segments, const Args& a, at::Tensor& keys, at::Tensor& labels) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = scores.size(0);
  const int64_t row_blocks = (rows + kSelectWarps - 1) / kSelectWarps;
  SHAMMIE_CHECK(row_blocks <= INT32_MAX, "frechet_topk: batch too large for one launch");
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(segments));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "frechet_gemm_select", [&] {
    with_list_capacity(a.k, [&](auto cap) {
      select_kernel<scalar_t, cap()><<<grid, kSelectWarps * 32, 0, stream>>>(
          scores.const_data_ptr<scalar_t>(), rows, scores.size(1), col_labels.const_data_ptr<int64_t>(), a.k,
          a.largest, segments, a.batch, row0, group0, keys.mutable_data_ptr<scalar_t>(),
          labels.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void cuda_finish(const Args& a, at::Tensor& keys, at::Tensor& labels) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.values.scalar_type(), "frechet_gemm_finish", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    launch_merge<scalar_t, acc_t>(a, keys.size(0), keys.mutable_data_ptr<acc_t>(), labels.mutable_data_ptr<int64_t>(),
                                  at::cuda::getCurrentCUDAStream());
  });
}

}  // namespace

const GemmSelect kCudaGemmSelect{cuda_segments, cuda_select, cuda_finish};

}  // namespace shammie::frechet::cuda

namespace {

using namespace shammie::frechet;

void topk_cuda(const Args& a) {
  const auto t = a.x.scalar_type();
  if (t == at::kHalf || t == at::kBFloat16) return shammie::frechet::cuda::topk_half(a);
  shammie::frechet::cuda::topk_float(a);
}

const Device kCuda{topk_cuda, shammie::frechet::cuda::kCudaGemmSelect};

}  // namespace

TORCH_LIBRARY_IMPL(shammie, CUDA, m) {
  m.impl("frechet_topk", [](const at::Tensor& p, const at::Tensor& d, int64_t k, const std::optional<at::Tensor>& c) {
    return frechet_topk(p, d, k, c, kCuda);
  });
  m.impl("gemm_bias_topk", [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t k,
                              const std::optional<at::Tensor>& c, bool largest) {
    return gemm_bias_topk(x, w, b, k, c, largest, kCuda);
  });
}
