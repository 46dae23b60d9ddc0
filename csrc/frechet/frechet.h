// Fréchet-mean search (Loki): the k best labels y of the score
//   s_b(y) = bias[y] + Σ_j x[b, j] · w[j, y]        (frechet_topk: x = probs, w = sq_dists, no bias)
// over the candidate labels, smallest first (or largest first), ties to the lowest label id, with no
// (B, N) score matrix: kernels compute tiles of scores and fold each into a running top-k per row.
// This header holds what the CPU and CUDA kernels share: the top-k order and insertion, the
// argument struct and the front end.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/host_device.h"

namespace shammie::frechet {

// No label: the id of an empty top-k slot, which every real (key, label) beats.
constexpr int64_t kNoLabel = INT64_MAX;

// The order of the running top-k: smaller key first, ties to the lower label. Keys are the scores,
// negated when the largest are wanted. A NaN key is never better than anything, so NaN scores are
// never chosen (a slot stays empty, label kNoLabel, only when a row has fewer than k non-NaN scores).
template <typename T>
SHAMMIE_HD bool better(T key, int64_t label, T other_key, int64_t other_label) {
  return key < other_key || (key == other_key && label < other_label);
}

// Inserts (key, label) into the sorted top-k list (keys[0] best) if it beats the last entry.
template <typename T>
SHAMMIE_HD void insert(T* keys, int64_t* labels, int64_t k, T key, int64_t label) {
  if (!better(key, label, keys[k - 1], labels[k - 1])) return;
  int64_t i = k - 1;
  while (i > 0 && better(key, label, keys[i - 1], labels[i - 1])) {
    keys[i] = keys[i - 1];
    labels[i] = labels[i - 1];
    --i;
  }
  keys[i] = key;
  labels[i] = label;
}

// The same list with a compile-time length and only compile-time indices, for the GEMM path's
// selection: a GPU thread's list then stays in registers, where insert's runtime-indexed shift would
// put it in local memory. The new entry walks down the list, trading places wherever it is better.
template <int kCap, typename T>
SHAMMIE_HD void insert_fixed(T (&keys)[kCap], int64_t (&labels)[kCap], T key, int64_t label) {
  if (!better(key, label, keys[kCap - 1], labels[kCap - 1])) return;
  SHAMMIE_UNROLL
  for (int i = 0; i < kCap; ++i) {
    if (better(key, label, keys[i], labels[i])) {
      const T key_i = keys[i];
      const int64_t label_i = labels[i];
      keys[i] = key;
      labels[i] = label;
      key = key_i;
      label = label_i;
    }
  }
}

// Drops a fixed list's best entry: the rest move up and an empty slot comes in last.
template <int kCap, typename T>
SHAMMIE_HD void pop_front_fixed(T (&keys)[kCap], int64_t (&labels)[kCap]) {
  SHAMMIE_UNROLL
  for (int i = 0; i + 1 < kCap; ++i) {
    keys[i] = keys[i + 1];
    labels[i] = labels[i + 1];
  }
  keys[kCap - 1] = T(INFINITY);
  labels[kCap - 1] = kNoLabel;
}

// Merges another sorted top-k list (empty slots last) into keys/labels. The other list is sorted, so
// the first entry that does not beat the current k-th ends the merge.
template <typename T>
SHAMMIE_HD void merge_sorted(T* keys, int64_t* labels, int64_t k, const T* other_keys, const int64_t* other_labels) {
  for (int64_t i = 0; i < k && other_labels[i] != kNoLabel; ++i) {
    if (!better(other_keys[i], other_labels[i], keys[k - 1], labels[k - 1])) break;
    insert(keys, labels, k, other_keys[i], other_labels[i]);
  }
}

// Merges row b's lists of groups 1.. into group 0's (keys and labels laid out (groups, batch, k)), then
// writes the row's k values (keys turned back into scores; NaN in an empty slot) and indices (-1 there).
template <typename acc_t, typename scalar_t>
SHAMMIE_HD void finish_row(int64_t b, int64_t batch, int64_t k, int64_t groups, bool largest, acc_t* keys,
                           int64_t* labels, scalar_t* values, int64_t* indices) {
  acc_t* best = keys + b * k;
  int64_t* lab = labels + b * k;
  for (int64_t g = 1; g < groups; ++g) merge_sorted(best, lab, k, keys + (g * batch + b) * k, labels + (g * batch + b) * k);
  for (int64_t i = 0; i < k; ++i) {
    const bool empty = lab[i] == kNoLabel;
    values[b * k + i] = static_cast<scalar_t>(empty ? acc_t(NAN) : (largest ? -best[i] : best[i]));
    indices[b * k + i] = empty ? -1 : lab[i];
  }
}

struct Args {
  int64_t batch, inner, labels, count, k;  // B, K, N, number of candidates, k
  bool largest;
  at::Tensor x;                          // (B, K), contiguous
  at::Tensor w;                          // (K, N), contiguous (sq_dists; never copied when it already is)
  std::optional<at::Tensor> bias;        // (N,), contiguous
  std::optional<at::Tensor> candidates;  // (count,) int64 label ids, sorted and unique; none: all N labels
  at::Tensor values;                     // (B, k), x's dtype
  at::Tensor indices;                    // (B, k), int64
};

using Kernel = void (*)(const Args&);

// Two implementations: the fused kernels (frechet_cpu_kernels.cpp, frechet_cuda.cuh) and tiled
// GEMMs plus a selection pass (frechet_gemm.cpp), for k ≤ kGemmMaxK. SHAMMIE_FRECHET_IMPL=
// kernel|gemm|auto picks one (auto: the GEMMs on CUDA for B·count ≥ 2^16, the kernels otherwise).
enum class Impl { kKernel, kGemm };
constexpr int64_t kGemmMaxK = 32;
Impl chosen_impl(const Args& a, bool cuda);

// Calls f(std::integral_constant<int, cap>{}) with the smallest list length cap in {1, 2, 4, ..., kGemmMaxK}
// that holds k (1 ≤ k ≤ kGemmMaxK): the selection's lists hold cap ≥ k entries and the first k are kept.
template <typename F>
void with_list_capacity(int64_t k, F&& f) {
  if (k <= 1) return f(std::integral_constant<int, 1>{});
  if (k <= 2) return f(std::integral_constant<int, 2>{});
  if (k <= 4) return f(std::integral_constant<int, 4>{});
  if (k <= 8) return f(std::integral_constant<int, 8>{});
  if (k <= 16) return f(std::integral_constant<int, 16>{});
  static_assert(kGemmMaxK == 32, "with_list_capacity's last case is kGemmMaxK");
  return f(std::integral_constant<int, 32>{});
}

// What the GEMM implementation needs from a device.
struct GemmSelect {
  int64_t (*segments)(int64_t cols);   // partial lists per row for a score block this wide
  // Folds scores (rows, cols) of rows [row0, row0 + rows), whose columns are the labels col_labels,
  // into the lists [group0, group0 + segments) of keys/labels (groups, B, k), each list written whole.
  void (*select)(const at::Tensor& scores, const at::Tensor& col_labels, int64_t row0, int64_t group0,
                 int64_t segments, const Args& a, at::Tensor& keys, at::Tensor& labels);
  // Merges each row's lists and writes a.values and a.indices.
  void (*finish)(const Args& a, at::Tensor& keys, at::Tensor& labels);
};
extern const GemmSelect kCpuGemmSelect;
void topk_gemm(const Args& a, const GemmSelect& device);

// What a device registers: its fused kernel and its GEMM selection; the front end picks one per call.
struct Device {
  Kernel kernel;
  const GemmSelect& gemm;
};

std::tuple<at::Tensor, at::Tensor> gemm_bias_topk(const at::Tensor& x, const at::Tensor& w,
                                                  const std::optional<at::Tensor>& bias, int64_t k,
                                                  const std::optional<at::Tensor>& candidates, bool largest,
                                                  const Device& device);
std::tuple<at::Tensor, at::Tensor> frechet_topk(const at::Tensor& probs, const at::Tensor& sq_dists, int64_t k,
                                                const std::optional<at::Tensor>& candidates, const Device& device);

}  // namespace shammie::frechet
