// CUDA kernels of selective_scan (math in selective_scan.h / ssm_math.h), included by one .cu per
// input dtype so that the instantiations compile in parallel.
//
// A block owns `cpb` channels of one batch row; each channel has `lpc` threads (N rounded up to a
// power of two), one per state n, holding h[n] in a register for the whole sequence. Time runs in
// tiles of kSubChunk steps: the block stages the tile's dt and u in shared memory (each row read
// once, coalesced along time), every thread advances its state, and y_t = Σ_n C·h is a shuffle
// sum over the channel's lanes (plus a shared-memory sum across warps when N > 32). Variable B and
// C are staged with the tile too, for the groups of the block's channels, so that no step waits on
// global memory (the first GPU measurements, which read them per step, ran at 1.5% of the copy
// bandwidth); where they do not fit in shared memory (float64 at large N on an A100 or sm_86) the
// steps read them from global memory as before. The forward writes the state at every checkpoint
// interval; the backward starts from those, recomputes each tile's states into registers and sweeps the tile in reverse, summing
// variable dB / dC over the block's channels in shared memory before its global atomics.
#pragma once

#include "common/errors.h"
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "common/cuda_smem.h"
#include "selective_scan/selective_scan.h"
#include "selective_scan/staged_bc.cuh"
#include "selective_scan/ssm_math.h"

namespace shammie::ssm::cuda {

constexpr int kT = static_cast<int>(kSubChunk);
constexpr int kBlockThreads = 128;     // threads per block when N ≤ 128 (N = 256 uses 256)
constexpr int kMaxChannels = 32;       // channels per block, and rows of the per-warp partial sums
constexpr int kMaxSubChunks = static_cast<int>(kMaxDstate / 16);   // sub-chunks per checkpoint interval

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

struct LaunchShape {
  int lpc, cpb, threads;
  int64_t staged_groups;   // groups of B / C a block stages per tile (its channels' groups, at most)
};

inline LaunchShape launch_shape(int64_t dstate, int64_t dim, int64_t groups) {
  int lpc = 1;
  while (lpc < dstate) lpc *= 2;
  const int cpb = std::max(1, std::min(kMaxChannels, kBlockThreads / lpc));
  // cpb consecutive channels span at most ceil((cpb − 1) / per_group) + 1 groups.
  const int64_t per_group = std::max<int64_t>(1, dim / groups);   // dim = 0 launches nothing
  const int64_t spanned = (cpb - 1 + per_group - 1) / per_group + 1;
  return {lpc, cpb, lpc * cpb, std::min(groups, spanned)};
}

// Elements in one staged array of a tile: [group slot][step][state].
inline int64_t staged_size(const LaunchShape& shape, int64_t dstate) { return shape.staged_groups * kT * dstate; }

template <typename scalar_t, typename acc_t>
struct ScanParams {
  int64_t batch, dim, L, N, groups, per_group, n_cp, interval, staged_groups;
  int lpc, cpb;
  bool softplus;
  bool stage_bc;          // variable B / C staged per tile in shared memory (else read from global)
  bool grads_in_shared;   // backward: variable dB / dC summed per tile in shared memory first
  const scalar_t* u;
  const scalar_t* delta;
  const scalar_t* z;
  const acc_t* A;
  const acc_t* B;
  const acc_t* C;
  const acc_t* D;
  const acc_t* bias;
  acc_t* checkpoints;
  scalar_t* out;
  // backward only
  const scalar_t* grad_out;
  const acc_t* grad_checkpoints;
  scalar_t* du;
  scalar_t* ddelta;
  scalar_t* dz;
  acc_t* dA;
  acc_t* dB;
  acc_t* dC;
  acc_t* dD;
  acc_t* dbias;
};

// Where this thread is: channel c of the block (global d), state n, batch row b; its group g is
// slot g − g_lo of the staged B / C tiles.
struct Place {
  int64_t b, d0, d, g, g_lo, slot;
  int c, n, width, warp_in_channel;
  bool channel_ok, state_ok;
};

template <typename P>
__device__ Place place(const P& p) {
  const int64_t blocks_per_row = (p.dim + p.cpb - 1) / p.cpb;
  Place q;
  q.b = blockIdx.x / blocks_per_row;
  q.d0 = (blockIdx.x % blocks_per_row) * p.cpb;
  q.c = threadIdx.x / p.lpc;
  q.n = threadIdx.x % p.lpc;
  q.d = q.d0 + q.c;
  q.channel_ok = q.d < p.dim;
  q.state_ok = q.channel_ok && q.n < p.N;
  q.g = (q.channel_ok ? q.d : p.dim - 1) / p.per_group;
  q.g_lo = q.d0 / p.per_group;
  q.slot = q.g - q.g_lo;
  q.width = p.lpc < 32 ? p.lpc : 32;
  q.warp_in_channel = q.n / 32;
  return q;
}

// Sum over the `width` lanes of this thread's channel within its warp.
template <typename T>
__device__ T lane_sum(T v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  return v;
}

// Shared-memory staging of one tile: [channel][step], padded against bank conflicts.
template <typename acc_t>
struct Tile {
  acc_t dt[kMaxChannels][kT + 1];
  acc_t u[kMaxChannels][kT + 1];
};

// Variable B and C of one tile (StagedBC, [slot][step][state] for the groups g_lo .. g_lo +
// staged_groups − 1), in the kernel's dynamic shared memory; in the backward, when p.grads_in_shared,
// the tile's dB and dC sums follow in the same layout.
template <bool kBvar, bool kCvar, typename P, typename acc_t>
__device__ StagedBC<acc_t> staged_bc(const P& p, acc_t* dynamic) {
  return carve_staged_bc(dynamic, p.staged_groups * kT * p.N, kBvar && p.stage_bc, kCvar && p.stage_bc,
                         p.grads_in_shared);
}

template <bool kBvar, bool kCvar, typename P, typename acc_t>
__device__ void load_tile(const P& p, const Place& q, int64_t t0, int steps, Tile<acc_t>& tile,
                          const StagedBC<acc_t>& staged) {
  for (int i = threadIdx.x; i < p.cpb * kT; i += blockDim.x) {
    const int c = i / kT, t = i % kT;
    const int64_t d = q.d0 + c;
    acc_t v = 0, u = 0;
    if (d < p.dim && t < steps) {
      const int64_t at = (q.b * p.dim + d) * p.L + t0 + t;
      v = acc_t(p.delta[at]) + p.bias[d];
      u = acc_t(p.u[at]);
    }
    tile.dt[c][t] = step_size(v, acc_t(0), p.softplus);
    tile.u[c][t] = u;
  }
  if (staged.b || staged.c) {
    // Each group's tile is contiguous in B / C ((batch, groups, L, N)): coalesced loads.
    const int64_t per_slot = int64_t(kT) * p.N;
    for (int64_t i = threadIdx.x; i < p.staged_groups * per_slot; i += blockDim.x) {
      const int64_t slot = i / per_slot, t = (i % per_slot) / p.N, g = q.g_lo + slot;
      const bool ok = g < p.groups && t < steps;
      const int64_t at = ((q.b * p.groups + g) * p.L + t0) * p.N + i % per_slot;
      if (staged.b) staged.b[i] = ok ? p.B[at] : acc_t(0);
      if (staged.c) staged.c[i] = ok ? p.C[at] : acc_t(0);
    }
  }
}

// B or C at step t0 + t (variable: from the staged tile, or from `global` where it was not staged), or
// the channel's constant.
template <bool kVariable, typename P, typename acc_t>
__device__ acc_t bc_value(const P& p, const Place& q, const acc_t* staged, const acc_t* global, acc_t constant,
                          int64_t t0, int t) {
  if constexpr (kVariable) {
    if (!q.state_ok) return acc_t(0);
    if (staged) return staged[(q.slot * kT + t) * p.N + q.n];
    return t0 + t < p.L ? global[((q.b * p.groups + q.g) * p.L + t0 + t) * p.N + q.n] : acc_t(0);
  } else {
    return constant;
  }
}

template <typename P>
__device__ int64_t checkpoint_at(const P& p, const Place& q, int64_t k) {
  return ((q.b * p.dim + q.d) * p.n_cp + k) * p.N + q.n;
}

// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, bool kBvar, bool kCvar>
__global__ void __launch_bounds__(256) scan_forward_kernel(const ScanParams<scalar_t, acc_t> p) {
  __shared__ Tile<acc_t> tile;
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  const StagedBC<acc_t> staged = staged_bc<kBvar, kCvar>(p, reinterpret_cast<acc_t*>(dynamic_smem));
  __shared__ acc_t part[kMaxChannels][kT + 1];     // per-warp sums of C·h: row w·cpb + c
  const Place q = place(p);
  const acc_t a = q.state_ok ? p.A[q.d * p.N + q.n] : acc_t(0);
  const acc_t b_const = !kBvar && q.state_ok ? p.B[q.d * p.N + q.n] : acc_t(0);
  const acc_t c_const = !kCvar && q.state_ok ? p.C[q.d * p.N + q.n] : acc_t(0);
  const int warps_per_channel = (p.lpc + 31) / 32;
  acc_t h = 0;
  for (int64_t t0 = 0; t0 < p.L; t0 += kT) {
    const int steps = static_cast<int>(min64(kT, p.L - t0));
    __syncthreads();
    load_tile<kBvar, kCvar>(p, q, t0, steps, tile, staged);
    __syncthreads();
    // Only h's multiply-add chains the steps; unrolling lets the exps and the lane sums overlap.
#pragma unroll 4
    for (int t = 0; t < steps; ++t) {
      const acc_t dt = tile.dt[q.c][t];
      h = state_step(h, dt, a, bc_value<kBvar>(p, q, staged.b, p.B, b_const, t0, t), tile.u[q.c][t]);
      const acc_t y = lane_sum(h * bc_value<kCvar>(p, q, staged.c, p.C, c_const, t0, t), q.width);
      if (q.n % q.width == 0) part[q.warp_in_channel * p.cpb + q.c][t] = y;
    }
    const int64_t t_end = t0 + steps;
    if (q.state_ok && (t_end % p.interval == 0 || t_end == p.L))
      p.checkpoints[checkpoint_at(p, q, (t_end - 1) / p.interval)] = h;
    __syncthreads();
    for (int i = threadIdx.x; i < p.cpb * kT; i += blockDim.x) {
      const int c = i / kT, t = i % kT;
      const int64_t d = q.d0 + c;
      if (d >= p.dim || t >= steps) continue;
      acc_t y = p.D[d] * tile.u[c][t];
      for (int w = 0; w < warps_per_channel; ++w) y += part[w * p.cpb + c][t];
      const int64_t at = (q.b * p.dim + d) * p.L + t0 + t;
      p.out[at] = scalar_t(p.z ? gate(y, acc_t(p.z[at])) : y);
    }
  }
}

// ---------------------------------------------------------------------------------------------

template <typename acc_t>
__device__ acc_t sigmoid(acc_t x) { return acc_t(1) / (acc_t(1) + vexp(-x)); }

// dB or dC of step t0 + t for variable B / C: summed over the channels of a warp first when they all
// belong to one group (one atomic per warp instead of one per channel), then into the tile's sums in
// shared memory (`tile_sum`, flushed by flush_variable_grads) or, without them, straight into global.
template <typename P, typename acc_t>
__device__ void add_variable_grad(const P& p, const Place& q, acc_t* grad, acc_t* tile_sum, int64_t t0, int t,
                                  acc_t v, bool warp_one_group) {
  const bool one_per_warp = warp_one_group && q.width < 32;
  if (one_per_warp)
    for (int offset = q.width; offset < 32; offset *= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (!q.state_ok || (one_per_warp && (threadIdx.x % 32) >= q.width)) return;
  if (tile_sum) atomicAdd(tile_sum + (q.slot * kT + t) * p.N + q.n, v);
  else atomicAdd(grad + ((q.b * p.groups + q.g) * p.L + t0 + t) * p.N + q.n, v);
}

// The tile's dB / dC sums: one global atomic per (group, step, state) per block, then zeros for the
// next tile. Between __syncthreads.
template <typename P, typename acc_t>
__device__ void flush_variable_grads(const P& p, const Place& q, const StagedBC<acc_t>& staged, int64_t t0, int steps) {
  const int64_t per_slot = int64_t(kT) * p.N;
  for (int64_t i = threadIdx.x; i < p.staged_groups * per_slot; i += blockDim.x) {
    const int64_t slot = i / per_slot, t = (i % per_slot) / p.N, g = q.g_lo + slot;
    const int64_t at = ((q.b * p.groups + g) * p.L + t0) * p.N + i % per_slot;
    if (g < p.groups && t < steps) {
      if (staged.db) atomicAdd(p.dB + at, staged.db[i]);
      if (staged.dc) atomicAdd(p.dC + at, staged.dc[i]);
    }
    if (staged.db) staged.db[i] = acc_t(0);
    if (staged.dc) staged.dc[i] = acc_t(0);
  }
}

template <typename scalar_t, typename acc_t, bool kBvar, bool kCvar>
__global__ void __launch_bounds__(256) scan_backward_kernel(const ScanParams<scalar_t, acc_t> p) {
  __shared__ Tile<acc_t> tile;
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  const StagedBC<acc_t> staged = staged_bc<kBvar, kCvar>(p, reinterpret_cast<acc_t*>(dynamic_smem));
  __shared__ acc_t dy_s[kMaxChannels][kT + 1];
  __shared__ acc_t part_a[kMaxChannels][kT + 1];   // C·h sums, then dL/d(dt) sums
  __shared__ acc_t part_b[kMaxChannels][kT + 1];   // dL/du sums
  __shared__ acc_t dD_s[kMaxChannels], dbias_s[kMaxChannels];
  const Place q = place(p);
  const acc_t a = q.state_ok ? p.A[q.d * p.N + q.n] : acc_t(0);
  const acc_t b_const = !kBvar && q.state_ok ? p.B[q.d * p.N + q.n] : acc_t(0);
  const acc_t c_const = !kCvar && q.state_ok ? p.C[q.d * p.N + q.n] : acc_t(0);
  const int warps_per_channel = (p.lpc + 31) / 32;
  // Whether this thread's warp holds channels of one group only (uniform within the warp).
  const int64_t warp_first = q.d0 + (threadIdx.x / 32) * 32 / p.lpc;
  const int64_t warp_last = min64(p.dim - 1, warp_first + (p.lpc < 32 ? 32 / p.lpc : 1) - 1);
  const bool warp_one_group = warp_first / p.per_group == warp_last / p.per_group;
  if (threadIdx.x < kMaxChannels) dD_s[threadIdx.x] = dbias_s[threadIdx.x] = 0;
  for (int64_t i = threadIdx.x; i < p.staged_groups * kT * p.N; i += blockDim.x) {   // the tile sums start at 0
    if (staged.db) staged.db[i] = acc_t(0);
    if (staged.dc) staged.dc[i] = acc_t(0);
  }
  acc_t G = 0, dA = 0, dB_const = 0, dC_const = 0;
  acc_t sub_start[kMaxSubChunks];
  for (int64_t k = p.n_cp - 1; k >= 0; --k) {
    if (p.grad_checkpoints && q.state_ok) G += p.grad_checkpoints[checkpoint_at(p, q, k)];
    const int64_t t_begin = k * p.interval, t_end = min64(p.L, t_begin + p.interval);
    const int subs = static_cast<int>((t_end - t_begin + kT - 1) / kT);
    acc_t h = k > 0 && q.state_ok ? p.checkpoints[checkpoint_at(p, q, k - 1)] : acc_t(0);
    sub_start[0] = h;
    for (int j = 0; j + 1 < subs; ++j) {   // states at each sub-chunk's start
      const int64_t t0 = t_begin + int64_t(j) * kT;
      __syncthreads();
      load_tile<kBvar, kCvar>(p, q, t0, kT, tile, staged);
      __syncthreads();
      for (int t = 0; t < kT; ++t)
        h = state_step(h, tile.dt[q.c][t], a, bc_value<kBvar>(p, q, staged.b, p.B, b_const, t0, t), tile.u[q.c][t]);
      sub_start[j + 1] = h;
    }
    for (int j = subs - 1; j >= 0; --j) {
      const int64_t t0 = t_begin + int64_t(j) * kT;
      const int steps = static_cast<int>(min64(kT, t_end - t0));
      __syncthreads();
      load_tile<kBvar, kCvar>(p, q, t0, steps, tile, staged);
      __syncthreads();
      // Recompute the tile's states (registers) and y = Σ C·h.
      acc_t hist[kT + 1];
      hist[0] = sub_start[j];
#pragma unroll
      for (int t = 0; t < kT; ++t) {
        if (t < steps) {
          hist[t + 1] = state_step(hist[t], tile.dt[q.c][t], a, bc_value<kBvar>(p, q, staged.b, p.B, b_const, t0, t), tile.u[q.c][t]);
          const acc_t y = lane_sum(hist[t + 1] * bc_value<kCvar>(p, q, staged.c, p.C, c_const, t0, t), q.width);
          if (q.n % q.width == 0) part_a[q.warp_in_channel * p.cpb + q.c][t] = y;
        }
      }
      __syncthreads();
      // Per (channel, step): the gate's gradients and dy.
      for (int i = threadIdx.x; i < p.cpb * kT; i += blockDim.x) {
        const int c = i / kT, t = i % kT;
        const int64_t d = q.d0 + c;
        acc_t dy = 0;
        if (d < p.dim && t < steps) {
          const int64_t at = (q.b * p.dim + d) * p.L + t0 + t;
          dy = acc_t(p.grad_out[at]);
          if (p.z) {
            acc_t y = p.D[d] * tile.u[c][t];
            for (int w = 0; w < warps_per_channel; ++w) y += part_a[w * p.cpb + c][t];
            const acc_t z = acc_t(p.z[at]), s = sigmoid(z);
            p.dz[at] = scalar_t(dy * y * s * (acc_t(1) + z * (acc_t(1) - s)));
            dy *= z * s;
          }
          atomicAdd(&dD_s[c], dy * tile.u[c][t]);
        }
        dy_s[c][t] = dy;
      }
      __syncthreads();
#pragma unroll
      for (int t = kT - 1; t >= 0; --t) {
        if (t < steps) {
          const acc_t dt = tile.dt[q.c][t], u = tile.u[q.c][t], dy = dy_s[q.c][t];
          const acc_t bv = bc_value<kBvar>(p, q, staged.b, p.B, b_const, t0, t);
          const acc_t g = G + bc_value<kCvar>(p, q, staged.c, p.C, c_const, t0, t) * dy;
          const acc_t decay = vexp(dt * a);
          const acc_t carried = g * hist[t] * decay;
          dA += carried * dt;
          const acc_t ddt = lane_sum(carried * a + g * bv * u, q.width);
          const acc_t du = lane_sum(g * dt * bv, q.width);
          if (q.n % q.width == 0) {
            part_a[q.warp_in_channel * p.cpb + q.c][t] = ddt;
            part_b[q.warp_in_channel * p.cpb + q.c][t] = du;
          }
          if constexpr (kBvar) add_variable_grad(p, q, p.dB, staged.db, t0, t, g * dt * u, warp_one_group);
          else dB_const += g * dt * u;
          if constexpr (kCvar) add_variable_grad(p, q, p.dC, staged.dc, t0, t, dy * hist[t + 1], warp_one_group);
          else dC_const += dy * hist[t + 1];
          G = decay * g;
        }
      }
      __syncthreads();
      if (staged.db || staged.dc) flush_variable_grads(p, q, staged, t0, steps);
      for (int i = threadIdx.x; i < p.cpb * kT; i += blockDim.x) {
        const int c = i / kT, t = i % kT;
        const int64_t d = q.d0 + c;
        if (d >= p.dim || t >= steps) continue;
        acc_t ddt = 0, du = p.D[d] * dy_s[c][t];
        for (int w = 0; w < warps_per_channel; ++w) {
          ddt += part_a[w * p.cpb + c][t];
          du += part_b[w * p.cpb + c][t];
        }
        const int64_t at = (q.b * p.dim + d) * p.L + t0 + t;
        const acc_t v = acc_t(p.delta[at]) + p.bias[d];
        const acc_t ddelta = p.softplus && v <= acc_t(20) ? ddt * sigmoid(v) : ddt;
        p.du[at] = scalar_t(du);
        p.ddelta[at] = scalar_t(ddelta);
        atomicAdd(&dbias_s[c], ddelta);
      }
    }
  }
  __syncthreads();
  if (q.state_ok) {
    atomicAdd(p.dA + q.d * p.N + q.n, dA);
    if constexpr (!kBvar) atomicAdd(p.dB + q.d * p.N + q.n, dB_const);
    if constexpr (!kCvar) atomicAdd(p.dC + q.d * p.N + q.n, dC_const);
  }
  if (threadIdx.x < p.cpb && q.d0 + threadIdx.x < p.dim) {
    atomicAdd(p.dD + q.d0 + threadIdx.x, dD_s[threadIdx.x]);
    atomicAdd(p.dbias + q.d0 + threadIdx.x, dbias_s[threadIdx.x]);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers, instantiated per input dtype by selective_scan_<dtype>.cu.

template <typename scalar_t, typename acc_t>
ScanParams<scalar_t, acc_t> make_params(const ScanArgs& a, const LaunchShape& shape) {
  ScanParams<scalar_t, acc_t> p{};
  p.batch = a.batch;
  p.dim = a.dim;
  p.L = a.seqlen;
  p.N = a.dstate;
  p.groups = a.groups;
  p.per_group = a.dim / a.groups;
  p.n_cp = a.checkpoints.size(2);
  p.interval = checkpoint_interval(a.dstate);
  p.staged_groups = shape.staged_groups;
  p.lpc = shape.lpc;
  p.cpb = shape.cpb;
  p.softplus = a.softplus;
  p.u = a.u.const_data_ptr<scalar_t>();
  p.delta = a.delta.const_data_ptr<scalar_t>();
  p.z = a.z ? a.z->const_data_ptr<scalar_t>() : nullptr;
  p.A = a.A.const_data_ptr<acc_t>();
  p.B = a.B.const_data_ptr<acc_t>();
  p.C = a.C.const_data_ptr<acc_t>();
  p.D = a.D.const_data_ptr<acc_t>();
  p.bias = a.delta_bias.const_data_ptr<acc_t>();
  return p;
}

inline unsigned num_blocks(const ScanArgs& a, const LaunchShape& shape) {
  const int64_t blocks = a.batch * ((a.dim + shape.cpb - 1) / shape.cpb);
  SHAMMIE_CHECK(blocks < (int64_t(1) << 31), "selective_scan: batch · dim is too large for one launch");
  return static_cast<unsigned>(blocks);
}

template <typename scalar_t>
void scan_forward_cuda(const ScanForwardArgs& args) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const ScanArgs& a = args.in;
  const c10::cuda::CUDAGuard guard(a.u.device());
  const LaunchShape shape = launch_shape(a.dstate, a.dim, a.groups);
  auto p = make_params<scalar_t, acc_t>(a, shape);
  p.checkpoints = a.checkpoints.mutable_data_ptr<acc_t>();
  p.out = args.out.mutable_data_ptr<scalar_t>();
  with_bc_forms(a.B_variable, a.C_variable, [&](auto Bv, auto Cv) {
    constexpr auto kernel = scan_forward_kernel<scalar_t, acc_t, decltype(Bv)::value, decltype(Cv)::value>;
    const StagingPlan plan = plan_staging<acc_t>(staged_size(shape, a.dstate), Bv, Cv, false,
                                                 shammie::cuda::dynamic_smem_limit<kernel>());
    p.stage_bc = plan.stage_bc;
    const size_t smem = shammie::cuda::allow_dynamic_smem<kernel>(plan.smem, "selective_scan");
    kernel<<<num_blocks(a, shape), shape.threads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void scan_backward_cuda(const ScanBackwardArgs& args) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const ScanArgs& a = args.in;
  const c10::cuda::CUDAGuard guard(a.u.device());
  const LaunchShape shape = launch_shape(a.dstate, a.dim, a.groups);
  auto p = make_params<scalar_t, acc_t>(a, shape);
  p.checkpoints = const_cast<acc_t*>(a.checkpoints.const_data_ptr<acc_t>());
  p.grad_out = args.grad_out.const_data_ptr<scalar_t>();
  p.grad_checkpoints = args.grad_checkpoints ? args.grad_checkpoints->const_data_ptr<acc_t>() : nullptr;
  p.du = args.du.mutable_data_ptr<scalar_t>();
  p.ddelta = args.ddelta.mutable_data_ptr<scalar_t>();
  p.dz = args.dz ? args.dz->mutable_data_ptr<scalar_t>() : nullptr;
  p.dA = args.dA.mutable_data_ptr<acc_t>();
  p.dB = args.dB.mutable_data_ptr<acc_t>();
  p.dC = args.dC.mutable_data_ptr<acc_t>();
  p.dD = args.dD.mutable_data_ptr<acc_t>();
  p.dbias = args.ddelta_bias.mutable_data_ptr<acc_t>();
  with_bc_forms(a.B_variable, a.C_variable, [&](auto Bv, auto Cv) {
    constexpr auto kernel = scan_backward_kernel<scalar_t, acc_t, decltype(Bv)::value, decltype(Cv)::value>;
    // Summing dB / dC per tile in shared memory first saves global atomics only when a block holds
    // several channels (N ≤ 64: 4× fewer at N = 16).
    const StagingPlan plan = plan_staging<acc_t>(staged_size(shape, a.dstate), Bv, Cv, shape.cpb >= 2,
                                                 shammie::cuda::dynamic_smem_limit<kernel>());
    p.stage_bc = plan.stage_bc;
    p.grads_in_shared = plan.grads_in_shared;
    const size_t smem = shammie::cuda::allow_dynamic_smem<kernel>(plan.smem, "selective_scan");
    kernel<<<num_blocks(a, shape), shape.threads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Defined in selective_scan_<dtype>.cu.
void scan_forward_float(const ScanForwardArgs& args);
void scan_backward_float(const ScanBackwardArgs& args);
void scan_forward_half(const ScanForwardArgs& args);
void scan_backward_half(const ScanBackwardArgs& args);
void scan_forward_bfloat16(const ScanForwardArgs& args);
void scan_backward_bfloat16(const ScanBackwardArgs& args);

}  // namespace shammie::ssm::cuda
