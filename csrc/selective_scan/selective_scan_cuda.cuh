// CUDA kernels of selective_scan (math in selective_scan.h / ssm_math.h): the pieces both directions
// share and the forward. Included (through selective_scan_backward.cuh) by one .cu per input dtype
// so that the instantiations compile in parallel.
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
// interval; the backward (selective_scan_backward.cuh) starts from those.
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

// A block runs `passes` rounds of cpb channels each (one round except in the deterministic backward,
// selective_scan_deterministic.cuh), so it owns span = cpb · passes consecutive channels.
struct LaunchShape {
  int lpc, cpb, threads, passes;
  int64_t staged_groups;   // groups of B / C a round stages per tile (its channels' groups, at most)
  int64_t span;
};

// Groups that `channels` consecutive channels can touch.
inline int64_t groups_spanned(int64_t channels, int64_t dim, int64_t groups) {
  const int64_t per_group = std::max<int64_t>(1, dim / groups);   // dim = 0 launches nothing
  return std::min(groups, (channels - 1 + per_group - 1) / per_group + 1);
}

inline LaunchShape launch_shape(int64_t dstate, int64_t dim, int64_t groups, int max_channels = kMaxChannels) {
  int lpc = 1;
  while (lpc < dstate) lpc *= 2;
  const int cpb = std::max(1, std::min(max_channels, kBlockThreads / lpc));
  return {lpc, cpb, lpc * cpb, 1, groups_spanned(cpb, dim, groups), cpb};
}

// Elements in one staged array of a tile: [group slot][step][state].
inline int64_t staged_size(const LaunchShape& shape, int64_t dstate) { return shape.staged_groups * kT * dstate; }

template <typename scalar_t, typename acc_t>
struct ScanParams {
  int64_t batch, dim, L, N, groups, per_group, n_cp, interval, staged_groups, span;
  int lpc, cpb, passes;
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
  // deterministic backward only (selective_scan_deterministic.cuh): dA, dD, dbias and constant dB / dC
  // then point at [batch][...] workspaces
  bool deterministic;
  int64_t ws_groups;   // group slots per block in ws_dB / ws_dC
  acc_t* ws_dB;        // variable dB / dC per block: [batch][block in row][group slot][L][N]
  acc_t* ws_dC;
};

// Where this thread is in round `pass`: channel c of the round (global d), state n, batch row b, block
// `blk` of the row; its group g is slot g − g_lo of the staged B / C tiles.
struct Place {
  int64_t b, blk, d0, d, g, g_lo, slot;
  int c, n, width, warp_in_channel;
  bool channel_ok, state_ok;
};

template <typename P>
__device__ Place place(const P& p, int pass = 0) {
  const int64_t blocks_per_row = (p.dim + p.span - 1) / p.span;
  Place q;
  q.b = blockIdx.x / blocks_per_row;
  q.blk = blockIdx.x % blocks_per_row;
  q.d0 = q.blk * p.span + int64_t(pass) * p.cpb;
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
  p.span = shape.span;
  p.lpc = shape.lpc;
  p.cpb = shape.cpb;
  p.passes = shape.passes;
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
  const int64_t blocks = a.batch * ((a.dim + shape.span - 1) / shape.span);
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

// Defined in selective_scan_<dtype>.cu.
void scan_forward_float(const ScanForwardArgs& args);
void scan_backward_float(const ScanBackwardArgs& args);
void scan_forward_half(const ScanForwardArgs& args);
void scan_backward_half(const ScanBackwardArgs& args);
void scan_forward_bfloat16(const ScanForwardArgs& args);
void scan_backward_bfloat16(const ScanBackwardArgs& args);

}  // namespace shammie::ssm::cuda
