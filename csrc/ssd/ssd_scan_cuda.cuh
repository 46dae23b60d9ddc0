// CUDA kernels of ssd_scan (math in ssd_scan.h), included by one .cu per input dtype so that the
// instantiations compile in parallel.
//
// A block owns `rpb` rows p of one (batch b, head h); each row has `lpr` threads (N rounded up to a
// power of two), one per state n, holding S[p, n] in a register for the whole sequence. Time runs in
// tiles of kT steps: the block stages the tile's dt_t and decay a_t = exp(dt_t·A_h) once per (head,
// step), x for its rows, and B_t, C_t of the head's group, in shared memory (so that no step waits on
// global memory; the first GPU measurements, which read B and C per step, took 22 ms where the
// floors say about 1; where B and C do not fit, as float64 at large N on sm_86, the steps read them
// from global memory instead); every thread advances its state, and
// y_t[p] = Σ_n C_t[n]·S_t[p, n] is a shuffle sum over the row's lanes (plus a shared-memory sum across
// warps when N > 32). The forward writes the state at the start of every checkpoint interval; the
// backward starts from those, recomputes each tile's states into registers and sweeps it in reverse.
// d(dt_t) sums over all P rows of a head, which span several blocks: the backward adds it up in a
// (batch, L, H) scratch in the accumulation dtype, and a second kernel chains it through softplus
// into ddt and ddt_bias.
#pragma once

#include "common/errors.h"
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <type_traits>

#include "common/cuda_smem.h"
#include "selective_scan/ssm_math.h"
#include "selective_scan/staged_bc.cuh"
#include "ssd/ssd_scan.h"

namespace shammie::ssd::cuda {

constexpr int kT = 32;                 // steps per tile
constexpr int kBlockThreads = 256;     // threads per block (fewer only when P and N are both small)
constexpr int kMaxRows = 32;           // rows per block, and rows of the per-warp partial sums
constexpr int kTilesPerInterval = static_cast<int>(kInterval / kT);
static_assert(kInterval % kT == 0, "a checkpoint interval must be whole tiles");

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

struct LaunchShape {
  int lpr, rpb, threads;
};

// lpr = N rounded up to a power of two; rpb rows fill kBlockThreads, but no more rows than P needs,
// and always at least one whole warp (the shuffles name all 32 lanes). threads is a power of two.
inline LaunchShape launch_shape(int64_t dstate, int64_t headdim) {
  int lpr = 1;
  while (lpr < dstate) lpr *= 2;
  int rows = 1;
  while (rows < headdim && rows < kMaxRows) rows *= 2;
  const int rpb = std::max(std::min({kMaxRows, kBlockThreads / lpr, rows}), std::max(1, 32 / lpr));
  return {lpr, rpb, lpr * rpb};
}

template <typename scalar_t, typename acc_t>
struct SsdParams : Layout, SsdInputs<scalar_t, acc_t> {   // Layout: L, H, P, G, N, heads_per_group, n_cp
  int lpr, rpb;
  bool softplus;
  bool stage_bc;            // each tile's B / C staged in shared memory (else read from global memory)
  bool grads_in_shared;     // backward: dB / dC summed per tile over the block's rows in shared memory first
  acc_t* checkpoints;       // written by the forward, read by the backward
  // forward only
  scalar_t* out;
  acc_t* final_state;
  acc_t* varlen_states;     // (num_seqs, H, P, N): the state at each packed sequence's last step

  // backward only
  const scalar_t* grad_out;
  const acc_t* grad_final;
  const acc_t* grad_varlen; // (num_seqs, H, P, N), or null
  scalar_t* dx;
  scalar_t* dz;
  acc_t* dA;
  acc_t* dB;
  acc_t* dC;
  acc_t* dD;
  acc_t* dinitial_states;
  acc_t* ddt_sum;           // (batch, L, H): dLoss/d(dt_t) after softplus, summed over the head's rows
};

// Where this thread is: row c of the block (global row p of head h), state n, batch b, group g.
struct Place {
  int64_t b, h, g, p0, p;
  int c, n, width, warp_in_row;
  bool row_ok, state_ok;
};

// Blocks run batch-major, then head, then row block: neighbouring blocks share B and C in L2.
template <typename Par>
__device__ Place place(const Par& p) {
  const int64_t blocks_per_head = (p.P + p.rpb - 1) / p.rpb;
  const int64_t bh = blockIdx.x / blocks_per_head;
  Place q;
  q.b = bh / p.H;
  q.h = bh % p.H;
  q.g = q.h / p.heads_per_group;
  q.p0 = (blockIdx.x % blocks_per_head) * p.rpb;
  q.c = threadIdx.x / p.lpr;
  q.n = threadIdx.x % p.lpr;
  q.p = q.p0 + q.c;
  q.row_ok = q.p < p.P;
  q.state_ok = q.row_ok && q.n < p.N;
  q.width = p.lpr < 32 ? p.lpr : 32;
  q.warp_in_row = q.n / 32;
  return q;
}

// Index maps of the layouts in ssd_scan.h (ssd::Layout), at this thread's row and state.
template <typename Par>
__device__ int64_t x_at(const Par& p, const Place& q, int64_t t, int64_t row) {   // (batch, L, H, P)
  return p.x_at(q.b, t, q.h) + row;
}
template <typename Par>
__device__ int64_t dt_at(const Par& p, const Place& q, int64_t t) {               // (batch, L, H)
  return p.dt_at(q.b, t, q.h);
}
template <typename Par>
__device__ int64_t bc_at(const Par& p, const Place& q, int64_t t) {               // (batch, L, G, N)
  return p.bc_at(q.b, t, q.h) + q.n;
}
template <typename Par>
__device__ int64_t state_at(const Par& p, const Place& q) {                       // (batch, H, P, N)
  return p.state_at(q.b, q.h) + q.p * p.N + q.n;
}
template <typename Par>
__device__ int64_t checkpoint_at(const Par& p, const Place& q, int64_t k) {       // (batch, H, n_cp, P, N)
  return p.checkpoint_at(q.b, q.h, k) + q.p * p.N + q.n;
}
template <typename Par>
__device__ int64_t varlen_at(const Par& p, const Place& q, int64_t s) {           // (num_seqs, H, P, N)
  return p.varlen_at(s, q.h) + q.p * p.N + q.n;
}

// B or C at step t0 + t: from the staged tile ([step][state], the block's group), or from global
// memory where the tile did not fit in shared memory (staged is null; padding steps read as 0, as staged).
template <typename Par, typename acc_t>
__device__ acc_t bc_value(const Par& p, const Place& q, const acc_t* staged, const acc_t* global, int64_t t0, int t) {
  if (!q.state_ok) return acc_t(0);
  if (staged) return staged[t * p.N + q.n];
  return t0 + t < p.L ? global[bc_at(p, q, t0 + t)] : acc_t(0);
}

using ssm::StagedBC;

// The tile's B and C ([kT][N] each) in the kernel's dynamic shared memory when p.stage_bc (else null);
// in the backward, when p.grads_in_shared, the tile's dB and dC sums after them (else null).
template <typename Par, typename acc_t>
__device__ StagedBC<acc_t> staged_bc(const Par& p, acc_t* dynamic) {
  return ssm::carve_staged_bc(dynamic, kT * p.N, p.stage_bc, p.stage_bc, p.grads_in_shared);
}

// Sum over the `width` lanes of this thread's row within its warp.
template <typename T>
__device__ T lane_sum(T v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  return v;
}

template <typename acc_t>
__device__ acc_t sigmoid(acc_t v) { return acc_t(1) / (acc_t(1) + vexp(-v)); }

// Shared-memory staging of one tile: the head's step sizes and decays, and x as [row][step] (padded
// against bank conflicts).
template <typename acc_t>
struct Tile {
  acc_t dt[kT];                // dt_t after bias and softplus
  acc_t decay[kT];             // a_t = exp(dt_t·A_h): one exp per (head, step), not per thread
  int64_t slot[kT];            // the packed sequence whose last step this is, or −1
  acc_t x[kMaxRows][kT + 1];
};

// Steps t ≥ `steps` are padding (dt = 0, x = 0); the loops stop before them.
template <typename Par, typename acc_t>
__device__ void load_tile(const Par& p, const Place& q, acc_t A_h, acc_t bias_h, int64_t t0, int steps,
                          Tile<acc_t>& tile, const StagedBC<acc_t>& staged) {
  if (threadIdx.x < kT) {   // blocks have at least 32 threads
    const int t = threadIdx.x;
    const acc_t dt = t < steps ? ssm::step_size(acc_t(p.dt[dt_at(p, q, t0 + t)]), bias_h, p.softplus) : acc_t(0);
    tile.dt[t] = dt;
    // A packed sequence's first step keeps nothing of the previous state (nor, backward, its gradient).
    tile.decay[t] = t < steps && starts_sequence(p.seq_idx, p.L, q.b, t0 + t) ? acc_t(0) : vexp(dt * A_h);
    tile.slot[t] = p.state_slot && t < steps ? p.state_slot[q.b * p.L + t0 + t] : int64_t(-1);
  }
  for (int i = threadIdx.x; i < p.rpb * kT; i += blockDim.x) {
    const int t = i / p.rpb, c = i % p.rpb;   // neighbouring threads read neighbouring rows of x
    const int64_t row = q.p0 + c;
    tile.x[c][t] = row < p.P && t < steps ? acc_t(p.x[x_at(p, q, t0 + t, row)]) : acc_t(0);
  }
  // Each step's N states are contiguous.
  for (int64_t i = threadIdx.x; staged.b && i < int64_t(kT) * p.N; i += blockDim.x) {
    const int t = static_cast<int>(i / p.N);
    const int64_t at = p.bc_at(q.b, t0 + t, q.h) + i % p.N;
    staged.b[i] = t < steps ? p.B[at] : acc_t(0);
    staged.c[i] = t < steps ? p.C[at] : acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads) ssd_forward_kernel(const SsdParams<scalar_t, acc_t> p) {
  __shared__ Tile<acc_t> tile;
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  const StagedBC<acc_t> staged = staged_bc(p, reinterpret_cast<acc_t*>(dynamic_smem));
  __shared__ acc_t part[kMaxRows][kT + 1];   // per-warp sums of C·S: row w·rpb + c
  const Place q = place(p);
  const acc_t A_h = p.A[q.h], bias_h = p.dt_bias[q.h];
  const int warps_per_row = (p.lpr + 31) / 32;
  acc_t S = p.initial_states && q.state_ok ? p.initial_states[state_at(p, q)] : acc_t(0);
  for (int64_t t0 = 0; t0 < p.L; t0 += kT) {
    const int steps = static_cast<int>(min64(kT, p.L - t0));
    // Checkpoint k holds the state before step k·kInterval (tiles start on interval boundaries).
    if (t0 % kInterval == 0 && q.state_ok) p.checkpoints[checkpoint_at(p, q, t0 / kInterval)] = S;
    __syncthreads();   // the previous tile's readers are done
    load_tile(p, q, A_h, bias_h, t0, steps, tile, staged);
    __syncthreads();
#pragma unroll 4
    for (int t = 0; t < steps; ++t) {
      S = tile.decay[t] * S + tile.dt[t] * tile.x[q.c][t] * bc_value(p, q, staged.b, p.B, t0, t);
      if (tile.slot[t] >= 0 && q.state_ok) p.varlen_states[varlen_at(p, q, tile.slot[t])] = S;
      const acc_t y = lane_sum(S * bc_value(p, q, staged.c, p.C, t0, t), q.width);
      if (q.n % q.width == 0) part[q.warp_in_row * p.rpb + q.c][t] = y;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < p.rpb * kT; i += blockDim.x) {
      const int t = i / p.rpb, c = i % p.rpb;   // neighbouring threads write neighbouring rows
      const int64_t row = q.p0 + c;
      if (row >= p.P || t >= steps) continue;
      acc_t y = p.D[q.h * p.P + row] * tile.x[c][t];
      for (int w = 0; w < warps_per_row; ++w) y += part[w * p.rpb + c][t];
      const int64_t at = x_at(p, q, t0 + t, row);
      p.out[at] = scalar_t(p.z ? ssm::gate(y, acc_t(p.z[at])) : y);
    }
  }
  if (q.state_ok) p.final_state[state_at(p, q)] = S;
}

// ---------------------------------------------------------------------------------------------

// dB or dC of step t0 + t. All rows of a block share (b, g), so when N < 32 the rows within a warp are
// summed by shuffles first: one atomic per (warp, state) instead of one per (row, state); then into the
// tile's sums in shared memory (`tile_sum`, flushed by flush_bc_grads) or, without them, into global.
template <typename Par, typename acc_t>
__device__ void add_bc_grad(const Par& p, const Place& q, acc_t* grad, acc_t* tile_sum, int64_t t0, int t, acc_t v) {
  for (int offset = q.width; offset < 32; offset *= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  // Lanes below `width` hold the warp's first row, whose row_ok implies that of any valid row.
  if (static_cast<int>(threadIdx.x % 32) >= q.width || !q.state_ok) return;
  if (tile_sum) atomicAdd(tile_sum + t * p.N + q.n, v);
  else atomicAdd(grad + bc_at(p, q, t0 + t), v);
}

// The tile's dB / dC sums: one global atomic per (step, state) per block, then zeros for the next
// tile. Between __syncthreads.
template <typename Par, typename acc_t>
__device__ void flush_bc_grads(const Par& p, const Place& q, const StagedBC<acc_t>& staged, int64_t t0, int steps) {
  for (int64_t i = threadIdx.x; i < int64_t(kT) * p.N; i += blockDim.x) {
    const int t = static_cast<int>(i / p.N);
    if (t < steps) {
      const int64_t at = p.bc_at(q.b, t0 + t, q.h) + i % p.N;
      atomicAdd(p.dB + at, staged.db[i]);
      atomicAdd(p.dC + at, staged.dc[i]);
    }
    staged.db[i] = acc_t(0);
    staged.dc[i] = acc_t(0);
  }
}

// v[j] with j known only at run time, without sending v to local memory.
template <typename acc_t>
__device__ acc_t pick(const acc_t (&v)[kTilesPerInterval], int j) {
  acc_t r = v[0];
#pragma unroll
  for (int i = 1; i < kTilesPerInterval; ++i) r = j == i ? v[i] : r;
  return r;
}

// Per step t (descending), with G = dL/dS_t from the steps after t:
//   g = G + C_t·dy_t (+ the varlen state's gradient at a packed sequence's last step);  dC_t += dy_t·S_t;
//   dB_t += g·dt_t·x_t;  dx_t += Σ_n g·dt_t·B_t + D·dy_t;
//   d(dt_t) += Σ_{p,n} g·(A_h·a_t·S_{t−1} + x_t·B_t);  dA_h += Σ g·a_t·S_{t−1}·dt_t;  G = a_t·g.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads) ssd_backward_kernel(const SsdParams<scalar_t, acc_t> p) {
  __shared__ Tile<acc_t> tile;
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  const StagedBC<acc_t> staged = staged_bc(p, reinterpret_cast<acc_t*>(dynamic_smem));
  __shared__ acc_t dy_s[kMaxRows][kT + 1];     // dL/dy through the gate
  __shared__ acc_t part_a[kMaxRows][kT + 1];   // per-warp C·S sums (for the gate), then d(dt) sums
  __shared__ acc_t part_b[kMaxRows][kT + 1];   // per-warp dx sums
  __shared__ acc_t dD_s[kMaxRows];
  __shared__ acc_t dA_s[kBlockThreads / 32];
  const Place q = place(p);
  const acc_t A_h = p.A[q.h], bias_h = p.dt_bias[q.h];
  const int warps_per_row = (p.lpr + 31) / 32;
  const int part_rows = warps_per_row * p.rpb;
  if (threadIdx.x < kMaxRows) dD_s[threadIdx.x] = 0;
  for (int64_t i = threadIdx.x; staged.db && i < int64_t(kT) * p.N; i += blockDim.x)   // the tile sums start at 0
    staged.db[i] = staged.dc[i] = acc_t(0);
  acc_t G = p.grad_final && q.state_ok ? p.grad_final[state_at(p, q)] : acc_t(0);
  acc_t dA = 0;
  for (int64_t k = p.n_cp - 1; k >= 0; --k) {
    const int64_t t_begin = k * kInterval, t_end = min64(p.L, t_begin + kInterval);
    const int tiles = static_cast<int>((t_end - t_begin + kT - 1) / kT);
    // The state at the start of each tile of the interval (only the last tile may be partial).
    acc_t tile_start[kTilesPerInterval];
    tile_start[0] = q.state_ok ? p.checkpoints[checkpoint_at(p, q, k)] : acc_t(0);
#pragma unroll
    for (int j = 0; j + 1 < kTilesPerInterval; ++j) {
      tile_start[j + 1] = tile_start[j];
      if (j + 1 < tiles) {
        const int64_t t0 = t_begin + int64_t(j) * kT;
        __syncthreads();
        load_tile(p, q, A_h, bias_h, t0, kT, tile, staged);
        __syncthreads();
        acc_t S = tile_start[j];
#pragma unroll 4
        for (int t = 0; t < kT; ++t)
          S = tile.decay[t] * S + tile.dt[t] * tile.x[q.c][t] * bc_value(p, q, staged.b, p.B, t0, t);
        tile_start[j + 1] = S;
      }
    }
    for (int j = tiles - 1; j >= 0; --j) {
      const int64_t t0 = t_begin + int64_t(j) * kT;
      const int steps = static_cast<int>(min64(kT, t_end - t0));
      __syncthreads();
      load_tile(p, q, A_h, bias_h, t0, steps, tile, staged);
      __syncthreads();
      // Recompute the tile's states into registers: hist[t] = S before step t0 + t; and, for the
      // gate, y's C·S part.
      acc_t hist[kT + 1];
      hist[0] = pick(tile_start, j);
#pragma unroll
      for (int t = 0; t < kT; ++t) {
        if (t < steps) {
          hist[t + 1] = tile.decay[t] * hist[t] + tile.dt[t] * tile.x[q.c][t] * bc_value(p, q, staged.b, p.B, t0, t);
          if (p.z) {
            const acc_t y = lane_sum(hist[t + 1] * bc_value(p, q, staged.c, p.C, t0, t), q.width);
            if (q.n % q.width == 0) part_a[q.warp_in_row * p.rpb + q.c][t] = y;
          }
        }
      }
      __syncthreads();
      // Per (row, step): the gate's gradient dz, dy = dL/dy, and dD.
      for (int i = threadIdx.x; i < p.rpb * kT; i += blockDim.x) {
        const int t = i / p.rpb, c = i % p.rpb;
        const int64_t row = q.p0 + c;
        acc_t dy = 0;
        if (row < p.P && t < steps) {
          const int64_t at = x_at(p, q, t0 + t, row);
          dy = acc_t(p.grad_out[at]);
          if (p.z) {
            acc_t y = p.D[q.h * p.P + row] * tile.x[c][t];
            for (int w = 0; w < warps_per_row; ++w) y += part_a[w * p.rpb + c][t];
            const acc_t z = acc_t(p.z[at]), s = sigmoid(z);
            p.dz[at] = scalar_t(dy * y * s * (acc_t(1) + z * (acc_t(1) - s)));
            dy *= z * s;
          }
          atomicAdd(&dD_s[c], dy * tile.x[c][t]);
        }
        dy_s[c][t] = dy;
      }
      __syncthreads();
#pragma unroll
      for (int t = kT - 1; t >= 0; --t) {
        if (t < steps) {
          const acc_t dt = tile.dt[t], a = tile.decay[t], xv = tile.x[q.c][t], dy = dy_s[q.c][t];
          const acc_t bv = bc_value(p, q, staged.b, p.B, t0, t);
          acc_t g = G + bc_value(p, q, staged.c, p.C, t0, t) * dy;   // dL/dS_t
          if (p.grad_varlen && tile.slot[t] >= 0 && q.state_ok) g += p.grad_varlen[varlen_at(p, q, tile.slot[t])];
          const acc_t carried = g * a * hist[t];                    // dL/da_t · a_t
          dA += carried * dt;
          const acc_t ddt = lane_sum(carried * A_h + g * xv * bv, q.width);
          const acc_t dx = lane_sum(g * dt * bv, q.width);
          if (q.n % q.width == 0) {
            part_a[q.warp_in_row * p.rpb + q.c][t] = ddt;
            part_b[q.warp_in_row * p.rpb + q.c][t] = dx;
          }
          add_bc_grad(p, q, p.dB, staged.db, t0, t, g * dt * xv);
          add_bc_grad(p, q, p.dC, staged.dc, t0, t, dy * hist[t + 1]);
          G = a * g;
        }
      }
      __syncthreads();
      if (staged.db) flush_bc_grads(p, q, staged, t0, steps);
      // d(dt_t): the block's rows summed here, the other row blocks of the head by the atomic.
      if (static_cast<int>(threadIdx.x) < steps) {
        acc_t s = 0;
        for (int r = 0; r < part_rows; ++r) s += part_a[r][threadIdx.x];
        atomicAdd(p.ddt_sum + dt_at(p, q, t0 + threadIdx.x), s);
      }
      for (int i = threadIdx.x; i < p.rpb * kT; i += blockDim.x) {
        const int t = i / p.rpb, c = i % p.rpb;
        const int64_t row = q.p0 + c;
        if (row >= p.P || t >= steps) continue;
        acc_t dx = p.D[q.h * p.P + row] * dy_s[c][t];
        for (int w = 0; w < warps_per_row; ++w) dx += part_b[w * p.rpb + c][t];
        p.dx[x_at(p, q, t0 + t, row)] = scalar_t(dx);
      }
    }
  }
  // G is now dL/dS_{−1}, the gradient of the initial state.
  if (p.dinitial_states && q.state_ok) p.dinitial_states[state_at(p, q)] = G;
  // dA_h: a block sum, then one atomic per block.
  for (int offset = 16; offset > 0; offset /= 2) dA += __shfl_xor_sync(0xffffffffu, dA, offset);
  if (threadIdx.x % 32 == 0) dA_s[threadIdx.x / 32] = dA;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t s = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) s += dA_s[w];
    atomicAdd(p.dA + q.h, s);
  }
  if (static_cast<int>(threadIdx.x) < p.rpb && q.p0 + threadIdx.x < p.P)
    atomicAdd(p.dD + q.h * p.P + q.p0 + threadIdx.x, dD_s[threadIdx.x]);
}

// ddt = d(dt_t)·softplus'(dt + dt_bias) (sigmoid, or 1 above 20 or without softplus), and
// ddt_bias_h = Σ_{b,t} ddt. Threads: x over heads (coalesced), y over (b, t) rows.
constexpr int kFinishRows = 8;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(32 * kFinishRows)
    ssd_ddt_kernel(int64_t rows, int64_t H, bool softplus, const acc_t* ddt_sum, const scalar_t* dt,
                   const acc_t* dt_bias, scalar_t* ddt, acc_t* ddt_bias) {
  __shared__ acc_t sums[kFinishRows][32];
  const int64_t h = int64_t(blockIdx.x) * 32 + threadIdx.x;
  acc_t local = 0;
  if (h < H) {
    const acc_t bias = dt_bias[h];
    for (int64_t r = int64_t(blockIdx.y) * kFinishRows + threadIdx.y; r < rows; r += int64_t(gridDim.y) * kFinishRows) {
      const int64_t at = r * H + h;
      const acc_t v = acc_t(dt[at]) + bias;
      const acc_t d = softplus && v <= acc_t(20) ? ddt_sum[at] * sigmoid(v) : ddt_sum[at];
      ddt[at] = scalar_t(d);
      local += d;
    }
  }
  sums[threadIdx.y][threadIdx.x] = local;
  __syncthreads();
  if (threadIdx.y == 0 && h < H) {
    acc_t s = 0;
    for (int r = 0; r < kFinishRows; ++r) s += sums[r][threadIdx.x];
    atomicAdd(ddt_bias + h, s);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers, instantiated per input dtype by ssd_scan_<dtype>.cu.

template <typename scalar_t, typename acc_t>
SsdParams<scalar_t, acc_t> make_params(const SsdArgs& a, const LaunchShape& shape) {
  SsdParams<scalar_t, acc_t> p{};
  static_cast<Layout&>(p) = layout_of(a);
  p.lpr = shape.lpr;
  p.rpb = shape.rpb;
  p.softplus = a.softplus;
  static_cast<SsdInputs<scalar_t, acc_t>&>(p) = SsdInputs<scalar_t, acc_t>::of(a);
  return p;
}

inline unsigned num_blocks(const SsdArgs& a, const LaunchShape& shape) {
  SHAMMIE_CHECK(a.dstate <= kMaxDstate, "ssd_scan: dstate above ", kMaxDstate, " is not supported on CUDA");
  const int64_t blocks = a.batch * a.heads * ((a.headdim + shape.rpb - 1) / shape.rpb);
  SHAMMIE_CHECK(blocks < (int64_t(1) << 31), "ssd_scan: batch · heads · headdim is too large for one launch");
  return static_cast<unsigned>(blocks);
}

template <typename scalar_t>
void ssd_forward_cuda(const SsdForwardArgs& args) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const SsdArgs& a = args.in;
  const c10::cuda::CUDAGuard guard(a.x.device());
  const LaunchShape shape = launch_shape(a.dstate, a.headdim);
  auto p = make_params<scalar_t, acc_t>(a, shape);
  p.checkpoints = a.checkpoints.mutable_data_ptr<acc_t>();
  p.out = args.out.mutable_data_ptr<scalar_t>();
  p.final_state = args.final_state.mutable_data_ptr<acc_t>();
  p.varlen_states = args.varlen_states.mutable_data_ptr<acc_t>();
  constexpr auto kernel = ssd_forward_kernel<scalar_t, acc_t>;
  const ssm::StagingPlan plan =
      ssm::plan_staging<acc_t>(kT * a.dstate, true, true, false, shammie::cuda::dynamic_smem_limit<kernel>());
  p.stage_bc = plan.stage_bc;
  const size_t smem = shammie::cuda::allow_dynamic_smem<kernel>(plan.smem, "ssd_scan");
  kernel<<<num_blocks(a, shape), shape.threads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void ssd_backward_cuda(const SsdBackwardArgs& args) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const SsdArgs& a = args.in;
  const c10::cuda::CUDAGuard guard(a.x.device());
  const LaunchShape shape = launch_shape(a.dstate, a.headdim);
  // d(dt) before softplus, summed over each head's rows by several blocks: zeros, then atomics.
  const at::Tensor ddt_sum = at::zeros({a.batch, a.seqlen, a.heads}, a.A.options());
  auto p = make_params<scalar_t, acc_t>(a, shape);
  p.checkpoints = const_cast<acc_t*>(a.checkpoints.const_data_ptr<acc_t>());
  p.grad_out = args.grad_out.const_data_ptr<scalar_t>();
  p.grad_final = args.grad_final ? args.grad_final->const_data_ptr<acc_t>() : nullptr;
  p.grad_varlen = args.grad_varlen ? args.grad_varlen->const_data_ptr<acc_t>() : nullptr;
  p.dx = args.dx.mutable_data_ptr<scalar_t>();
  p.dz = args.dz ? args.dz->mutable_data_ptr<scalar_t>() : nullptr;
  p.dA = args.dA.mutable_data_ptr<acc_t>();
  p.dB = args.dB.mutable_data_ptr<acc_t>();
  p.dC = args.dC.mutable_data_ptr<acc_t>();
  p.dD = args.dD.mutable_data_ptr<acc_t>();
  p.dinitial_states = args.dinitial_states ? args.dinitial_states->mutable_data_ptr<acc_t>() : nullptr;
  p.ddt_sum = ddt_sum.mutable_data_ptr<acc_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr auto kernel = ssd_backward_kernel<scalar_t, acc_t>;
  // Summing dB / dC over the block's rows in shared memory first saves global atomics where the block
  // spans several warps (2× at N = 128, 8× at N = 16).
  const ssm::StagingPlan plan = ssm::plan_staging<acc_t>(kT * a.dstate, true, true, shape.threads > 32,
                                                         shammie::cuda::dynamic_smem_limit<kernel>());
  p.stage_bc = plan.stage_bc;
  p.grads_in_shared = plan.grads_in_shared;
  const size_t smem = shammie::cuda::allow_dynamic_smem<kernel>(plan.smem, "ssd_scan");
  kernel<<<num_blocks(a, shape), shape.threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t rows = a.batch * a.seqlen;
  const dim3 block(32, kFinishRows);
  const dim3 grid(static_cast<unsigned>((a.heads + 31) / 32),
                  static_cast<unsigned>(std::min<int64_t>((rows + kFinishRows - 1) / kFinishRows, 1024)));
  ssd_ddt_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
      rows, a.heads, a.softplus, p.ddt_sum, p.dt, p.dt_bias, args.ddt.mutable_data_ptr<scalar_t>(),
      args.ddt_bias.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Defined in ssd_scan_<dtype>.cu.
void ssd_forward_float(const SsdForwardArgs& args);
void ssd_backward_float(const SsdBackwardArgs& args);
void ssd_forward_half(const SsdForwardArgs& args);
void ssd_backward_half(const SsdBackwardArgs& args);
void ssd_forward_bfloat16(const SsdForwardArgs& args);
void ssd_backward_bfloat16(const SsdBackwardArgs& args);

}  // namespace shammie::ssd::cuda
