// The deterministic backward of selective_scan on CUDA (under torch.use_deterministic_algorithms).
// The default backward adds variable dB / dC over the channels of a group, and dA, dD, d(delta_bias)
// and constant dB / dC over the batch, with float atomics, whose order changes from run to run. Here
// every such sum has a fixed order:
//  - inside a block, a round's variable dB / dC of a tile go to shared memory per channel
//    ([channel][step][state]) and are added in channel order (flush_channel_grads);
//  - each block owns `span` = cpb · passes channels, run as `passes` rounds one after another, and
//    adds its variable dB / dC into its own slice of a workspace ([batch][block][group slot][L][N])
//    with plain read-add-writes; sum_block_partials then adds each group's slices in block order;
//  - the per-channel gradients go to [batch][...] workspaces (one writer each), and at::sum adds them
//    over the batch.
// Rounds trade parallelism for workspace: about kBlocksPerSm blocks per SM, and more rounds while the
// variable dB / dC workspace would pass SHAMMIE_SCAN_WORKSPACE_MB (default 256).
#pragma once

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "common/env_cap.h"
#include "selective_scan/selective_scan_cuda.cuh"

namespace shammie::ssm::cuda {

constexpr int64_t kBlocksPerSm = 8;

// A round's per-channel variable dB / dC of one tile ([c][step][state] each) in dynamic shared
// memory, after the staged B / C; null where absent (constant B / C, one channel per round, or not
// deterministic).
template <typename acc_t>
struct ChannelGrads {
  acc_t* db;
  acc_t* dc;
};

template <typename acc_t>
size_t channel_grads_bytes(const LaunchShape& shape, int64_t dstate, bool b, bool c) {
  if (shape.cpb < 2) return 0;
  return static_cast<size_t>((int(b) + int(c)) * int64_t(shape.cpb) * kT * dstate) * sizeof(acc_t);
}

template <bool kBvar, bool kCvar, typename P, typename acc_t>
__device__ ChannelGrads<acc_t> channel_grads(const P& p, acc_t* dynamic) {
  ChannelGrads<acc_t> channel{nullptr, nullptr};
  if (!p.deterministic || p.cpb < 2) return channel;
  acc_t* at = dynamic + staged_bc_bytes<acc_t>(p.staged_groups * kT * p.N, kBvar && p.stage_bc, kCvar && p.stage_bc,
                                               p.grads_in_shared) / sizeof(acc_t);
  const int64_t size = int64_t(p.cpb) * kT * p.N;
  if (kBvar) {
    channel.db = at;
    at += size;
  }
  if (kCvar) channel.dc = at;
  return channel;
}

// Where (group g, step t, state n) of this thread's block lies in a variable dB / dC workspace.
template <typename P>
__device__ int64_t workspace_at(const P& p, const Place& q, int64_t g, int64_t t, int64_t n) {
  const int64_t blocks_per_row = (p.dim + p.span - 1) / p.span;
  const int64_t slot = g - q.blk * p.span / p.per_group;
  return (((q.b * blocks_per_row + q.blk) * p.ws_groups + slot) * p.L + t) * p.N + n;
}

// The tile's variable dB / dC from the round's per-channel buffers, added over its channels in order
// into the block's workspace slice. Between __syncthreads.
template <typename P, typename acc_t>
__device__ void flush_channel_grads(const P& p, const Place& q, const ChannelGrads<acc_t>& channel, int64_t t0,
                                    int steps) {
  const int64_t per_slot = int64_t(kT) * p.N;
  for (int64_t i = threadIdx.x; i < p.staged_groups * per_slot; i += blockDim.x) {
    const int64_t slot = i / per_slot, t = (i % per_slot) / p.N, n = i % p.N, g = q.g_lo + slot;
    if (g >= p.groups || t >= steps) continue;
    acc_t db = 0, dc = 0;
    for (int c = 0; c < p.cpb; ++c) {
      const int64_t d = q.d0 + c;
      if (d >= p.dim || d / p.per_group != g) continue;
      const int64_t at = (int64_t(c) * kT + t) * p.N + n;
      if (channel.db) db += channel.db[at];
      if (channel.dc) dc += channel.dc[at];
    }
    const int64_t at = workspace_at(p, q, g, t0 + t, n);
    if (channel.db) p.ws_dB[at] += db;
    if (channel.dc) p.ws_dC[at] += dc;
  }
}

// A per-channel gradient of batch row b (dA and constant dB / dC: per_row = dim · N; dD and
// d(delta_bias): per_row = dim): a float atomic into the sum over the batch or, deterministic, a store
// into row b of a [batch][per_row] workspace (this block alone owns it).
template <typename P, typename acc_t>
__device__ void add_channel_grad(const P& p, acc_t* grad, int64_t b, int64_t at, int64_t per_row, acc_t v) {
  if (p.deterministic) grad[b * per_row + at] = v;
  else atomicAdd(grad + at, v);
}

// dB or dC (variable: [batch][groups][L][N]) from the blocks' workspace slices, each group's slices
// added in block order.
template <typename acc_t>
__global__ void sum_block_partials(const acc_t* workspace, acc_t* grad, int64_t batch, int64_t groups, int64_t L,
                                   int64_t N, int64_t per_group, int64_t span, int64_t blocks_per_row,
                                   int64_t ws_groups) {
  const int64_t total = batch * groups * L * N, plane = L * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t inner = i % plane, g = (i / plane) % groups, b = i / (plane * groups);
    const int64_t first = g * per_group / span, last = min64(blocks_per_row - 1, ((g + 1) * per_group - 1) / span);
    acc_t sum = 0;
    for (int64_t blk = first; blk <= last; ++blk) {
      const int64_t slot = g - blk * span / per_group;
      sum += workspace[((b * blocks_per_row + blk) * ws_groups + slot) * plane + inner];
    }
    grad[i] = sum;
  }
}

inline int64_t blocks_per_row(const ScanArgs& a, const LaunchShape& shape) { return (a.dim + shape.span - 1) / shape.span; }

inline int64_t workspace_groups(const ScanArgs& a, const LaunchShape& shape) {
  return groups_spanned(shape.span, a.dim, a.groups);
}

// The deterministic backward's launch shape: the default one, or one channel per round where the
// per-channel buffers do not fit in `smem_limit`; then the rounds per block (see the top).
template <typename acc_t>
LaunchShape deterministic_shape(const ScanArgs& a, bool b_variable, bool c_variable, size_t smem_limit) {
  LaunchShape shape = launch_shape(a.dstate, a.dim, a.groups);
  if (channel_grads_bytes<acc_t>(shape, a.dstate, b_variable, c_variable) > smem_limit)
    shape = launch_shape(a.dstate, a.dim, a.groups, 1);
  const int arrays = int(b_variable) + int(c_variable);
  const int64_t rounds_per_row = (a.dim + shape.cpb - 1) / shape.cpb;
  if (arrays == 0 || rounds_per_row == 0 || a.batch == 0) return shape;
  auto with_passes = [&](int64_t passes) {
    LaunchShape s = shape;
    s.passes = static_cast<int>(passes);
    s.span = shape.cpb * passes;
    return s;
  };
  auto workspace_bytes = [&](const LaunchShape& s) {
    return a.batch * blocks_per_row(a, s) * workspace_groups(a, s) * a.seqlen * a.dstate * int64_t(sizeof(acc_t)) *
           arrays;
  };
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t cap = env_cap_bytes("SHAMMIE_SCAN_WORKSPACE_MB", 256);
  int64_t passes = std::clamp<int64_t>(a.batch * rounds_per_row / (kBlocksPerSm * sms), 1, rounds_per_row);
  while (passes < rounds_per_row && workspace_bytes(with_passes(passes)) > cap)
    passes = std::min(rounds_per_row, 2 * passes);
  return with_passes(passes);
}

// The workspaces the kernel writes instead of the gradients (undefined where unused).
struct DeterministicWorkspace {
  at::Tensor dA, dB, dC, dD, dbias;
};

// Allocates the workspaces and points the kernel's parameters at them.
template <typename scalar_t, typename acc_t>
DeterministicWorkspace use_deterministic_workspace(const ScanBackwardArgs& args, const LaunchShape& shape,
                                                   ScanParams<scalar_t, acc_t>& p) {
  const ScanArgs& a = args.in;
  const auto options = args.dA.options();
  DeterministicWorkspace w;
  w.dA = at::zeros({a.batch, a.dim, a.dstate}, options);
  w.dD = at::zeros({a.batch, a.dim}, options);
  w.dbias = at::zeros({a.batch, a.dim}, options);
  const std::vector<int64_t> variable{a.batch, blocks_per_row(a, shape), workspace_groups(a, shape), a.seqlen, a.dstate};
  const std::vector<int64_t> constant{a.batch, a.dim, a.dstate};
  w.dB = at::zeros(a.B_variable ? variable : constant, options);
  w.dC = at::zeros(a.C_variable ? variable : constant, options);
  p.deterministic = true;
  p.ws_groups = workspace_groups(a, shape);
  p.dA = w.dA.mutable_data_ptr<acc_t>();
  p.dD = w.dD.mutable_data_ptr<acc_t>();
  p.dbias = w.dbias.mutable_data_ptr<acc_t>();
  (a.B_variable ? p.ws_dB : p.dB) = w.dB.mutable_data_ptr<acc_t>();
  (a.C_variable ? p.ws_dC : p.dC) = w.dC.mutable_data_ptr<acc_t>();
  return w;
}

// The gradients from the workspaces, after the kernel.
template <typename acc_t>
void finish_deterministic_sums(const ScanBackwardArgs& args, const LaunchShape& shape, const DeterministicWorkspace& w) {
  const ScanArgs& a = args.in;
  static constexpr int64_t kBatchDim[] = {0};
  auto sum_over_batch = [](at::Tensor out, const at::Tensor& workspace) {
    at::sum_out(out, workspace, at::IntArrayRef(kBatchDim));
  };
  sum_over_batch(args.dA, w.dA);
  sum_over_batch(args.dD, w.dD);
  sum_over_batch(args.ddelta_bias, w.dbias);
  const int64_t total = a.batch * a.groups * a.seqlen * a.dstate;
  auto finish_bc = [&](bool variable, const at::Tensor& grad, const at::Tensor& workspace) {
    if (!variable) return sum_over_batch(grad, workspace);
    if (total == 0) return;
    constexpr int kThreads = 256;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const auto grid = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 16 * sms));
    sum_block_partials<acc_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        workspace.const_data_ptr<acc_t>(), grad.mutable_data_ptr<acc_t>(), a.batch, a.groups, a.seqlen, a.dstate,
        a.dim / a.groups, shape.span, blocks_per_row(a, shape), workspace_groups(a, shape));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  finish_bc(a.B_variable, args.dB, w.dB);
  finish_bc(a.C_variable, args.dC, w.dC);
}

}  // namespace shammie::ssm::cuda
