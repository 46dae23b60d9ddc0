// The search as tiled GEMMs plus a selection pass (the exact brute-force design of GPU k-NN
// libraries): score blocks of at most kScoreBudgetBytes come from the BLAS (cuBLAS's tensor cores
// on CUDA), each device folds a block into partial top-k lists per row, and a merge per row keeps
// the k best. Memory stays bounded by the block; the (B, N) score matrix never exists. Same order,
// ties and NaN rule as the fused kernels (frechet.h). CPU selection here; CUDA's in frechet_cuda.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "common/errors.h"
#include "common/impl_override.h"
#include "frechet/frechet.h"

namespace shammie::frechet {
namespace {

constexpr int64_t kScoreBudgetBytes = int64_t(32) << 20;
constexpr int64_t kMinBlockCols = 1024;

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// (rows, cols) scores in the accumulation dtype: fp16/bf16 products accumulate in fp32 and stay fp32.
at::Tensor score_block(const at::Tensor& x, const at::Tensor& w) {
  const at::ScalarType acc = acc_type(x.scalar_type());
  if (x.scalar_type() == acc) return at::mm(x, w);
  if (x.is_cuda()) return at::mm(x, w, acc);           // cuBLAS with an fp32 output
  return at::mm(x.to(acc), w.to(acc));                  // CPU has no mixed-dtype mm
}

template <typename acc_t, int kCap>
void cpu_select_typed(const at::Tensor& scores, const at::Tensor& col_labels, int64_t row0, int64_t group,
                      const Args& a, at::Tensor& keys, at::Tensor& labels) {
  const int64_t rows = scores.size(0), cols = scores.size(1), k = a.k;
  const acc_t* s = scores.const_data_ptr<acc_t>();
  const int64_t* ids = col_labels.const_data_ptr<int64_t>();
  acc_t* key_out = keys.mutable_data_ptr<acc_t>();
  int64_t* label_out = labels.mutable_data_ptr<int64_t>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t best[kCap];
      int64_t lab[kCap];
      std::fill(best, best + kCap, std::numeric_limits<acc_t>::infinity());
      std::fill(lab, lab + kCap, kNoLabel);
      for (int64_t c = 0; c < cols; ++c) {
        const acc_t v = s[r * cols + c];
        insert_fixed(best, lab, a.largest ? -v : v, ids[c]);
      }
      const int64_t at = (group * a.batch + row0 + r) * k;
      std::copy(best, best + k, key_out + at);
      std::copy(lab, lab + k, label_out + at);
    }
  });
}

void cpu_select(const at::Tensor& scores, const at::Tensor& col_labels, int64_t row0, int64_t group0,
                int64_t /*segments*/, const Args& a, at::Tensor& keys, at::Tensor& labels) {
  with_list_capacity(a.k, [&](auto cap) {
    if (scores.scalar_type() == at::kDouble)
      return cpu_select_typed<double, cap()>(scores, col_labels, row0, group0, a, keys, labels);
    cpu_select_typed<float, cap()>(scores, col_labels, row0, group0, a, keys, labels);
  });
}

void cpu_finish(const Args& a, at::Tensor& keys, at::Tensor& labels) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.values.scalar_type(), "frechet_gemm_finish", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    acc_t* key_data = keys.mutable_data_ptr<acc_t>();
    int64_t* label_data = labels.mutable_data_ptr<int64_t>();
    scalar_t* values = a.values.mutable_data_ptr<scalar_t>();
    int64_t* indices = a.indices.mutable_data_ptr<int64_t>();
    at::parallel_for(0, a.batch, 64, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        finish_row(b, a.batch, a.k, keys.size(0), a.largest, key_data, label_data, values, indices);
    });
  });
}

}  // namespace

const GemmSelect kCpuGemmSelect{[](int64_t) -> int64_t { return 1; }, cpu_select, cpu_finish};

Impl chosen_impl(const Args& a, bool cuda) {
  if (const std::optional<int> forced = impl_override("SHAMMIE_FRECHET_IMPL", {"kernel", "gemm"})) {
    // The selection keeps at most kGemmMaxK per lane; larger k stays on the fused kernels.
    return *forced == 1 && a.k <= kGemmMaxK ? Impl::kGemm : Impl::kKernel;
  }
  // CPU: the fused kernels win (benchmarks/RESULTS.md). CUDA: the GEMMs beat the fused kernel by 2.5
  // to 13 times at every measured shape, B = 16 included (H200, benchmarks/RESULTS.md); the fused
  // kernel keeps the tiny problems, one launch against several.
  return cuda && a.k <= kGemmMaxK && a.batch * a.count >= (int64_t(1) << 16) ? Impl::kGemm : Impl::kKernel;
}

void topk_gemm(const Args& a, const GemmSelect& device) {
  SHAMMIE_CHECK(a.k >= 1 && a.k <= kGemmMaxK, "frechet_topk: the GEMM implementation takes 1 ≤ k ≤ ", kGemmMaxK,
                ", got k=", a.k, " (chosen_impl keeps larger k on the fused kernels)");
  const at::ScalarType acc = acc_type(a.x.scalar_type());
  const int64_t acc_bytes = acc == at::kDouble ? 8 : 4;
  const int64_t cols = std::clamp<int64_t>(kScoreBudgetBytes / (acc_bytes * std::max<int64_t>(a.batch, 1)),
                                           std::min(kMinBlockCols, a.count), a.count);
  const int64_t rows = std::clamp<int64_t>(kScoreBudgetBytes / (acc_bytes * cols), 1, a.batch);
  const int64_t col_blocks = (a.count + cols - 1) / cols;
  const int64_t segments = device.segments(cols);
  at::Tensor keys = at::empty({col_blocks * segments, a.batch, a.k}, a.x.options().dtype(acc));
  at::Tensor labels = at::empty({col_blocks * segments, a.batch, a.k}, a.x.options().dtype(at::kLong));
  for (int64_t cb = 0; cb < col_blocks; ++cb) {
    const int64_t c0 = cb * cols, c1 = std::min(a.count, c0 + cols);
    const at::Tensor ids = a.candidates ? a.candidates->slice(0, c0, c1)
                                        : at::arange(c0, c1, a.x.options().dtype(at::kLong));
    const at::Tensor w_block = a.candidates ? a.w.index_select(1, ids) : a.w.slice(1, c0, c1);
    std::optional<at::Tensor> bias_block;
    if (a.bias) bias_block = (a.candidates ? a.bias->index_select(0, ids) : a.bias->slice(0, c0, c1)).to(acc);
    for (int64_t r0 = 0; r0 < a.batch; r0 += rows) {
      at::Tensor scores = score_block(a.x.slice(0, r0, std::min(a.batch, r0 + rows)), w_block);
      if (bias_block) scores.add_(*bias_block);
      device.select(scores, ids, r0, cb * segments, segments, a, keys, labels);
    }
  }
  device.finish(a, keys, labels);
}

}  // namespace shammie::frechet
