// CUDA kernels of the Fréchet / GEMM + bias + top-k search (order and insertion in frechet.h),
// included by one .cu per dtype pair so that the instantiations compile in parallel.
//
// A block of 4 warps owns kBM rows and a contiguous group of label tiles of kBN columns. For each
// label tile it computes the (kBM × kBN) score tile over K in steps of kBK, staged through shared
// memory (w's columns gathered through the candidate ids when there are any): fp16/bf16 on the
// tensor cores (wmma 16×16×16, fp32 accumulators, each warp a 32×32 quarter), fp32/fp64 with FMA
// (each thread an 8×4 piece). The tile lands in shared memory and each warp folds its rows into
// running top-k lists (one per (group, row), in global scratch that only this warp touches): a
// warp-wide arg-best of the lanes' candidates that beat the row's k-th entry, inserted by lane 0,
// repeated until no lane beats it (usually at once after the first tiles). A second kernel merges
// the groups' lists per row.
#pragma once

#include "common/errors.h"
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "frechet/frechet.h"

namespace shammie::frechet::cuda {

constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128, kWarps = kThreads / 32;
constexpr int kPadAB = 8, kPadC = 4;   // row padding of the staged tiles (wmma needs ld % 8 == 0)
constexpr int kLdA = kBK + kPadAB, kLdB = kBN + kPadAB, kLdC = kBN + kPadC;

void topk_float(const Args& a);   // float32 and float64, frechet_cuda.cu
void topk_half(const Args& a);    // float16 and bfloat16, frechet_half.cu

template <typename T> struct WmmaType { using type = T; };
template <> struct WmmaType<c10::Half> { using type = __half; };
template <> struct WmmaType<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename scalar_t, typename acc_t>
struct Params {
  int64_t batch, inner, count, k, groups, label_tiles;
  bool largest;
  const scalar_t* x;       // (B, K)
  const scalar_t* w;       // (K, N)
  const scalar_t* bias;    // (N,) or null
  const int64_t* ids;      // (count,) or null
  int64_t ldw;             // N
  acc_t* keys;             // (groups, B, k)
  int64_t* labels;         // (groups, B, k)
};

// Shared memory: the staged x and w tiles, reused for the score tile once the GEMM is done.
template <typename smem_t, typename acc_t>
constexpr int smem_bytes() {
  constexpr int ab = (kBM * kLdA + kBK * kLdB) * int(sizeof(smem_t));
  constexpr int c = kBM * kLdC * int(sizeof(acc_t));
  return ab > c ? ab : c;
}

template <typename T>
__device__ __forceinline__ T positive_infinity() { return T(INFINITY); }

// Stages x[r0 : r0 + kBM, k0 : k0 + kBK] and w[k0 : k0 + kBK, labels of c0 : c0 + kBN] (zero outside).
template <typename scalar_t, typename acc_t, typename smem_t>
__device__ __forceinline__ void stage(const Params<scalar_t, acc_t>& p, int64_t r0, int64_t k0, int64_t c0,
                                      smem_t* As, smem_t* Bs) {
  for (int e = threadIdx.x; e < kBM * kBK; e += kThreads) {
    const int r = e / kBK, kk = e % kBK;
    const int64_t row = r0 + r, col = k0 + kk;
    const scalar_t v = (row < p.batch && col < p.inner) ? p.x[row * p.inner + col] : scalar_t(0);
    As[r * kLdA + kk] = static_cast<smem_t>(v);
  }
  for (int e = threadIdx.x; e < kBK * kBN; e += kThreads) {
    const int kk = e / kBN, c = e % kBN;
    const int64_t row = k0 + kk, pos = c0 + c;
    scalar_t v = scalar_t(0);
    if (row < p.inner && pos < p.count) v = p.w[row * p.ldw + (p.ids ? p.ids[pos] : pos)];
    Bs[kk * kLdB + c] = static_cast<smem_t>(v);
  }
}

// The (kBM × kBN) score tile of rows r0.. and candidate positions c0.., into Cs (row stride kLdC).
template <typename scalar_t, typename acc_t, typename smem_t, bool kWmma>
__device__ __forceinline__ void score_tile(const Params<scalar_t, acc_t>& p, int64_t r0, int64_t c0,
                                           unsigned char* smem, acc_t* Cs) {
  smem_t* As = reinterpret_cast<smem_t*>(smem);
  smem_t* Bs = As + kBM * kLdA;
  const int warp = threadIdx.x / 32;
  if constexpr (kWmma) {
    using namespace nvcuda;
    using T = typename WmmaType<smem_t>::type;
    const int wr = warp / 2, wc = warp % 2;   // this warp's 32×32 quarter
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int64_t k0 = 0; k0 < p.inner; k0 += kBK) {
      stage(p, r0, k0, c0, As, Bs);
      __syncthreads();
      const T* A = reinterpret_cast<const T*>(As);
      const T* Bm = reinterpret_cast<const T*>(Bs);
      for (int ks = 0; ks < kBK; ks += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], A + (wr * 32 + i * 16) * kLdA + ks, kLdA);
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Bm + ks * kLdB + wc * 32 + j * 16, kLdB);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wr * 32 + i * 16) * kLdC + wc * 32 + j * 16, acc[i][j], kLdC,
                                wmma::mem_row_major);
  } else {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;   // rows ty + 8i, columns tx + 16j
    acc_t acc[8][4] = {};
    for (int64_t k0 = 0; k0 < p.inner; k0 += kBK) {
      stage(p, r0, k0, c0, As, Bs);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kBK; ++kk) {
        acc_t b[4];
        for (int j = 0; j < 4; ++j) b[j] = Bs[kk * kLdB + tx + 16 * j];
        for (int i = 0; i < 8; ++i) {
          const acc_t av = As[(ty + 8 * i) * kLdA + kk];
          for (int j = 0; j < 4; ++j) acc[i][j] = fma(av, b[j], acc[i][j]);
        }
      }
      __syncthreads();
    }
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j) Cs[(ty + 8 * i) * kLdC + tx + 16 * j] = acc[i][j];
  }
  __syncthreads();
}

// Folds row r of the score tile into the row's list (keys, labels), one warp.
template <typename scalar_t, typename acc_t>
__device__ void fold_row(const Params<scalar_t, acc_t>& p, const acc_t* crow, int64_t c0, acc_t* keys,
                         int64_t* labels) {
  const int lane = threadIdx.x % 32;
  constexpr int kPer = kBN / 32;
  acc_t key[kPer];
  int64_t label[kPer];
  bool live[kPer];
  for (int j = 0; j < kPer; ++j) {
    const int c = lane + 32 * j;
    const int64_t pos = c0 + c;
    live[j] = pos < p.count;
    label[j] = live[j] ? (p.ids ? p.ids[pos] : pos) : kNoLabel;
    acc_t v = crow[c];
    if (live[j] && p.bias) v += static_cast<acc_t>(p.bias[label[j]]);
    key[j] = p.largest ? -v : v;
  }
  const int64_t k = p.k;
  while (true) {
    const acc_t worst_key = keys[k - 1];
    const int64_t worst_label = labels[k - 1];
    // This lane's best live entry that beats the row's k-th.
    int pick = -1;
    for (int j = 0; j < kPer; ++j)
      if (live[j] && better(key[j], label[j], worst_key, worst_label) &&
          (pick < 0 || better(key[j], label[j], key[pick], label[pick])))
        pick = j;
    bool has = pick >= 0;
    acc_t best_key = has ? key[pick] : acc_t(0);
    int64_t best_label = has ? label[pick] : kNoLabel;
    for (int off = 16; off > 0; off /= 2) {
      const bool o_has = __shfl_xor_sync(0xffffffffu, has, off);
      const acc_t o_key = __shfl_xor_sync(0xffffffffu, best_key, off);
      const int64_t o_label = __shfl_xor_sync(0xffffffffu, best_label, off);
      if (o_has && (!has || better(o_key, o_label, best_key, best_label))) {
        has = true;
        best_key = o_key;
        best_label = o_label;
      }
    }
    if (!has) break;
    for (int j = 0; j < kPer; ++j)
      if (live[j] && label[j] == best_label) live[j] = false;
    if (lane == 0) insert(keys, labels, k, best_key, best_label);
    __syncwarp();
  }
}

template <typename scalar_t, typename acc_t, typename smem_t, bool kWmma>
__global__ void __launch_bounds__(kThreads) topk_tiles_kernel(Params<scalar_t, acc_t> p) {
  __shared__ __align__(32) unsigned char smem[smem_bytes<smem_t, acc_t>()];
  acc_t* Cs = reinterpret_cast<acc_t*>(smem);
  const int64_t r0 = int64_t(blockIdx.x) * kBM;
  const int64_t g = blockIdx.y;
  const int64_t t0 = g * p.label_tiles / p.groups, t1 = (g + 1) * p.label_tiles / p.groups;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kBM && r0 + r < p.batch; r += kWarps) {
    const int64_t at = (g * p.batch + r0 + r) * p.k;
    for (int64_t i = lane; i < p.k; i += 32) {
      p.keys[at + i] = positive_infinity<acc_t>();
      p.labels[at + i] = kNoLabel;
    }
  }
  __syncwarp();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = t * kBN;
    score_tile<scalar_t, acc_t, smem_t, kWmma>(p, r0, c0, smem, Cs);
    for (int r = warp; r < kBM && r0 + r < p.batch; r += kWarps) {
      const int64_t at = (g * p.batch + r0 + r) * p.k;
      fold_row(p, Cs + r * kLdC, c0, p.keys + at, p.labels + at);
    }
    __syncthreads();   // the next tile's staging overwrites Cs
  }
}

// Merges the groups' lists of each row into group 0's, then writes values and indices.
template <typename scalar_t, typename acc_t>
__global__ void merge_kernel(int64_t batch, int64_t k, int64_t groups, bool largest, acc_t* keys, int64_t* labels,
                             scalar_t* values, int64_t* indices) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < batch) finish_row(b, batch, k, groups, largest, keys, labels, values, indices);
}

// One thread per row: merge_kernel over the (groups, batch, k) lists into a.values and a.indices.
template <typename scalar_t, typename acc_t>
void launch_merge(const Args& a, int64_t groups, acc_t* keys, int64_t* labels, cudaStream_t stream) {
  constexpr int kMergeThreads = 128;
  merge_kernel<scalar_t, acc_t><<<static_cast<unsigned>((a.batch + kMergeThreads - 1) / kMergeThreads),
                                  kMergeThreads, 0, stream>>>(
      a.batch, a.k, groups, a.largest, keys, labels, a.values.mutable_data_ptr<scalar_t>(),
      a.indices.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, typename smem_t, bool kWmma>
void launch(const Args& a) {
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t row_blocks = (a.batch + kBM - 1) / kBM;
  const int64_t label_tiles = (a.count + kBN - 1) / kBN;
  SHAMMIE_CHECK(row_blocks <= INT32_MAX, "gemm_bias_topk: batch too large for one launch");
  const int64_t groups = std::clamp<int64_t>((4 * sms + row_blocks - 1) / row_blocks, 1,
                                             std::min<int64_t>(label_tiles, 65535));
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor keys = at::empty({groups, a.batch, a.k}, a.x.options().dtype(acc_type));
  at::Tensor labels = at::empty({groups, a.batch, a.k}, a.x.options().dtype(at::kLong));
  Params<scalar_t, acc_t> p{a.batch, a.inner, a.count, a.k, groups, label_tiles, a.largest,
                            a.x.const_data_ptr<scalar_t>(), a.w.const_data_ptr<scalar_t>(),
                            a.bias ? a.bias->const_data_ptr<scalar_t>() : nullptr,
                            a.candidates ? a.candidates->const_data_ptr<int64_t>() : nullptr, a.labels,
                            keys.mutable_data_ptr<acc_t>(), labels.mutable_data_ptr<int64_t>()};
  topk_tiles_kernel<scalar_t, acc_t, smem_t, kWmma>
      <<<dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(groups)), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_merge<scalar_t, acc_t>(a, groups, p.keys, p.labels, stream);
}

}  // namespace shammie::frechet::cuda
