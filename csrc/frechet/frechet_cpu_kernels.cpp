// CPU kernel of the Fréchet / GEMM + bias + top-k search (order and insertion in frechet.h),
// compiled once per instruction set.
//
// The candidate labels are cut into tiles of kTileN columns and the rows into tiles of kTileB. A
// work item owns a range of row tiles and a group of label tiles; for each label tile it takes the
// (K × kTileN) slab of w once (a view of w itself, or for fp16/bf16 inputs and candidate lists a copy
// converted to the accumulation type), and for each of its row tiles computes the (kTileB × kTileN)
// scores with one GEMM (MKL / oneDNN through at::mm_out, single-threaded inside the parallel
// region) into a per-thread buffer that stays in cache, then folds them into the rows' running
// top-k. bf16 on a processor with AVX512-BF16 instead packs the slab for common/bf16_dot.h, which
// computes the same fp32 sums about twice as fast as converting to fp32 for MKL. Each group's top-k
// lists are merged at the end; since (key, label) is a total order the result does not depend on the
// number of threads. Extra memory: a score tile and a slab per thread, and the (groups × B × k)
// partial lists.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/bf16_dot.h"
#include "frechet/frechet.h"

SHAMMIE_CPU_TARGET_BEGIN

namespace shammie::SHAMMIE_CPU_NAMESPACE {
namespace {

using namespace frechet;

constexpr int64_t kTileB = 1024;
constexpr int64_t kTileN = 256;
static_assert(kTileN % 16 == 0, "bf16_dot writes score rows padded to 16 columns");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How the work is split: `groups` label groups × `chunks` row chunks, about 4 items per thread.
struct Split {
  int64_t row_tiles, label_tiles, groups, chunks, tiles_per_chunk;
};

Split split_work(int64_t batch, int64_t count) {
  Split s{};
  s.row_tiles = ceil_div(batch, kTileB);
  s.label_tiles = ceil_div(count, kTileN);
  const int64_t items = 4 * static_cast<int64_t>(at::get_num_threads());
  s.groups = std::clamp<int64_t>(items, 1, s.label_tiles);
  s.chunks = std::clamp<int64_t>(ceil_div(items, s.groups), 1, s.row_tiles);
  s.tiles_per_chunk = ceil_div(s.row_tiles, s.chunks);
  s.chunks = ceil_div(s.row_tiles, s.tiles_per_chunk);
  return s;
}

// Folds one row of scores (columns c0 + [0, n)) into its top-k, adding the bias and negating for
// `largest`. k = 1 is a vectorized min (first index of the minimum wins).
template <typename acc_t, typename scalar_t>
inline void fold_row(acc_t* row, int64_t n, int64_t c0, const int64_t* ids, const scalar_t* bias, bool largest,
                     int64_t k, acc_t* keys, int64_t* labels) {
  if (bias || largest) {
    const acc_t sign = largest ? acc_t(-1) : acc_t(1);
    if (bias && ids) {
      for (int64_t c = 0; c < n; ++c) row[c] = sign * (row[c] + static_cast<acc_t>(bias[ids[c0 + c]]));
    } else if (bias) {
      const scalar_t* bb = bias + c0;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) row[c] = sign * (row[c] + static_cast<acc_t>(bb[c]));
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) row[c] = -row[c];
    }
  }
  if (k == 1) {
    acc_t best = std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(min : best)
    for (int64_t c = 0; c < n; ++c) best = row[c] < best ? row[c] : best;
    int64_t at = 0;
    while (at < n && !(row[at] == best)) ++at;   // none when the row is all NaN
    if (at < n) insert(keys, labels, 1, best, ids ? ids[c0 + at] : c0 + at);
    return;
  }
  for (int64_t c = 0; c < n; ++c) {
    if (!(row[c] <= keys[k - 1])) continue;      // cheap reject (also NaN); ties go through `insert`
    insert(keys, labels, k, row[c], ids ? ids[c0 + c] : c0 + c);
  }
}

template <typename scalar_t>
void topk_typed(const Args& a) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  // bf16 through the AVX512-BF16 tile GEMM: x stays bf16 and the slab is packed, not converted.
  const bool use_bf16_dot = std::is_same_v<scalar_t, c10::BFloat16> && bf16_dot::available();
  const bool convert = !std::is_same_v<scalar_t, acc_t> && !use_bf16_dot;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = a.batch, K = a.inner, C = a.count, k = a.k;
  const Split s = split_work(B, C);
  const int64_t* ids = a.candidates ? a.candidates->const_data_ptr<int64_t>() : nullptr;
  const scalar_t* bias = a.bias ? a.bias->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* w = a.w.const_data_ptr<scalar_t>();
  const at::Tensor x = convert ? a.x.to(acc_type) : a.x;   // (B, K): small next to the (K, N) slabs
  const bool stage = !use_bf16_dot && (convert || ids);

  // Partial top-k lists, (groups, B, k).
  std::vector<acc_t> keys(static_cast<size_t>(s.groups * B * k), std::numeric_limits<acc_t>::infinity());
  std::vector<int64_t> labels(keys.size(), kNoLabel);

  at::parallel_for(0, s.groups * s.chunks, 1, [&](int64_t begin, int64_t end) {
    const auto opts = at::TensorOptions().dtype(acc_type);
    at::Tensor scores = at::empty({kTileB * kTileN}, opts);
    at::Tensor slab = stage ? at::empty({K * kTileN}, opts) : at::Tensor();
    at::Tensor packed = use_bf16_dot ? at::empty({bf16_dot::packed_words(K, kTileN)}, opts.dtype(at::kInt))
                                 : at::Tensor();
    acc_t* sc = scores.mutable_data_ptr<acc_t>();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item % s.groups, chunk = item / s.groups;
      const int64_t t0 = g * s.label_tiles / s.groups, t1 = (g + 1) * s.label_tiles / s.groups;
      const int64_t r0 = chunk * s.tiles_per_chunk * kTileB, r1 = std::min(B, r0 + s.tiles_per_chunk * kTileB);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * kTileN, n = std::min(kTileN, C - c0);
        at::Tensor wt;
        int64_t ld = n;  // row stride of the score tile
        if (use_bf16_dot) {
          bf16_dot::pack(reinterpret_cast<const c10::BFloat16*>(w), a.labels, ids, c0, K, n,
                         reinterpret_cast<uint32_t*>(packed.mutable_data_ptr<int32_t>()));
          ld = bf16_dot::padded_columns(n);
        } else if (stage) {
          acc_t* dst = slab.mutable_data_ptr<acc_t>();
          for (int64_t j = 0; j < K; ++j) {
            const scalar_t* src = w + j * a.labels;
            acc_t* d = dst + j * n;
            if (ids) {
              for (int64_t c = 0; c < n; ++c) d[c] = static_cast<acc_t>(src[ids[c0 + c]]);
            } else {
#pragma omp simd
              for (int64_t c = 0; c < n; ++c) d[c] = static_cast<acc_t>(src[c0 + c]);
            }
          }
          wt = slab.narrow(0, 0, K * n).view({K, n});
        } else {
          wt = a.w.narrow(1, c0, n);
        }
        for (int64_t b0 = r0; b0 < r1; b0 += kTileB) {
          const int64_t rows = std::min(kTileB, r1 - b0);
          if (use_bf16_dot) {
            if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
              bf16_dot::gemm(x.const_data_ptr<scalar_t>() + b0 * K, rows, K,
                             reinterpret_cast<const uint32_t*>(packed.const_data_ptr<int32_t>()), n, sc);
          } else {
            at::Tensor out = scores.narrow(0, 0, rows * n).view({rows, n});
            at::mm_out(out, x.narrow(0, b0, rows), wt);
          }
          for (int64_t r = 0; r < rows; ++r) {
            const size_t at_row = static_cast<size_t>((g * B + b0 + r) * k);
            fold_row(sc + r * ld, n, c0, ids, bias, a.largest, k, keys.data() + at_row, labels.data() + at_row);
          }
        }
      }
    }
  });

  scalar_t* values = a.values.mutable_data_ptr<scalar_t>();
  int64_t* indices = a.indices.mutable_data_ptr<int64_t>();
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      finish_row(b, B, k, s.groups, a.largest, keys.data(), labels.data(), values, indices);
  });
}

}  // namespace

void frechet_gemm_bias_topk(const Args& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "frechet_gemm_bias_topk",
                                  [&] { topk_typed<scalar_t>(a); });
}

}  // namespace shammie::SHAMMIE_CPU_NAMESPACE

SHAMMIE_CPU_TARGET_END
