// Device code shared by the Monarch forward and backward kernels (math in monarch.h).
// A thread block owns a tile of tokens. Long reductions (u = W1·x, grad z = W2ᵀ·grad v) are
// done by groups of G lanes that stride along the reduction with coalesced loads and then sum
// with warp shuffles; every group computes kChunk outputs at once so each input load serves
// kChunk multiply-adds.
#pragma once

#include "common/errors.h"
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "monarch/monarch.h"

namespace shammie::monarch::cuda {

constexpr int kThreads = 256;
constexpr int kChunk = 8;                        // outputs per group task
constexpr int64_t kSharedBytes = 48 * 1024;      // no opt-in needed up to this
constexpr int kMaxTileTokens = 32;

// Sum over the G lanes (a power of two ≤ 32) of each group; all 32 lanes of the warp must call.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int G) {
  for (int offset = G / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, G);
  return v;
}

// For t < tokens, b < blocks, o < outs:  store(t, b, o, Σ_{j < len} in(t, b, j) · w(b, o, j)).
// Tasks (t, b, chunk of kChunk outputs) are spread over the block's groups of G lanes; the loop
// over tasks advances a whole warp at a time so the shuffles see every lane.
template <typename acc_t, typename In, typename W, typename Store>
__device__ __forceinline__ void group_dots(int64_t tokens, int64_t blocks, int64_t outs,
                                           int64_t len, int G, In in, W w, Store store) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int groups_per_warp = 32 / G, g_lane = lane % G, g_index = lane / G;
  const int64_t chunks = (outs + kChunk - 1) / kChunk;
  const int64_t tasks = tokens * blocks * chunks;
  for (int64_t base = int64_t(warp) * groups_per_warp; base < tasks;
       base += int64_t(warps) * groups_per_warp) {
    const int64_t task = base + g_index;
    const bool active = task < tasks;
    const int64_t t = active ? task / (blocks * chunks) : 0;
    const int64_t b = active ? (task / chunks) % blocks : 0;
    const int64_t o0 = active ? (task % chunks) * kChunk : 0;
    const int n_out = active ? int(std::min<int64_t>(kChunk, outs - o0)) : 0;
    acc_t acc[kChunk];
#pragma unroll
    for (int o = 0; o < kChunk; ++o) acc[o] = acc_t(0);
    if (active) {
      for (int64_t j = g_lane; j < len; j += G) {
        const acc_t v = in(t, b, j);
#pragma unroll
        for (int o = 0; o < kChunk; ++o)
          if (o < n_out) acc[o] += w(b, o0 + o, j) * v;
      }
    }
#pragma unroll
    for (int o = 0; o < kChunk; ++o) acc[o] = group_sum(acc[o], G);
    if (active && g_lane == 0) {
#pragma unroll
      for (int o = 0; o < kChunk; ++o)
        if (o < n_out) store(t, b, o0 + o, acc[o]);
    }
  }
}

// u for the block's tile, token-major: u[t·(k·q) + i·q + a] = Σ_j W1[i, a, j] · x[t0 + t, i·p + j].
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_u(const Dims& d, const scalar_t* __restrict__ x,
                                       int64_t x_row, const scalar_t* __restrict__ w1,
                                       int64_t t0, int64_t tokens, int G, acc_t* u) {
  group_dots<acc_t>(
      tokens, d.k, d.q, d.p, G,
      [&](int64_t t, int64_t i, int64_t j) { return acc_t(x[(t0 + t) * x_row + i * d.p + j]); },
      [&](int64_t i, int64_t a, int64_t j) { return acc_t(w1[(i * d.q + a) * d.p + j]); },
      [&](int64_t t, int64_t i, int64_t a, acc_t v) { u[t * d.mid() + i * d.q + a] = v; });
}

inline int multiprocessors(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Lanes per reduction group: about eight elements per lane, at least 4 lanes.
inline int group_size(int64_t len) {
  int G = 4;
  while (G < 32 && int64_t(G) * 8 < len) G *= 2;
  return G;
}

// Tokens per block: enough blocks to fill the device, no more per-block scratch than fits in
// shared memory (0 tokens means the scratch must go to global memory).
inline int64_t tile_tokens(int64_t tokens, int sms, int64_t scratch_bytes_per_token) {
  int64_t tile = std::clamp<int64_t>((tokens + 4 * sms - 1) / (4 * sms), 1, kMaxTileTokens);
  while (tile > 1 && tile * scratch_bytes_per_token > kSharedBytes) tile /= 2;
  return tile;
}

// Blocks of `tile` tokens for a 1-D grid (gridDim.x < 2^31).
inline int64_t token_blocks(int64_t tokens, int64_t tile) {
  const int64_t blocks = (tokens + tile - 1) / tile;
  SHAMMIE_CHECK(blocks <= INT32_MAX, "blockdiag_butterfly_multiply: ", tokens, " tokens are too many for one CUDA launch");
  return blocks;
}

}  // namespace shammie::monarch::cuda
