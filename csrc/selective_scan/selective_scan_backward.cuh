// The backward kernel of selective_scan on CUDA, and its launcher. Each round of a block (one, except
// in the deterministic backward) starts from the forward's checkpoints, recomputes each tile's states
// into registers and sweeps the tile in reverse. Variable dB / dC are summed over the round's
// channels in shared memory, then added into dB / dC with global atomics; the per-channel gradients
// (dA, dD, d(delta_bias), constant dB / dC) are summed over the batch the same way. Under
// torch.use_deterministic_algorithms every one of those sums runs in a fixed order instead
// (selective_scan_deterministic.cuh).
#pragma once

#include "selective_scan/selective_scan_cuda.cuh"
#include "selective_scan/selective_scan_deterministic.cuh"

namespace shammie::ssm::cuda {

template <typename acc_t>
__device__ acc_t sigmoid(acc_t x) { return acc_t(1) / (acc_t(1) + vexp(-x)); }

// dB or dC of step t0 + t for variable B / C. Deterministic: into the round's per-channel buffer
// (`channel_buf`, added in channel order by flush_channel_grads) or, with one channel per round,
// straight into the block's workspace slice. Otherwise summed over the channels of a warp first when
// they all belong to one group (one atomic per warp instead of one per channel), then into the tile's
// sums in shared memory (`tile_sum`, flushed by flush_variable_grads) or straight into global.
template <typename P, typename acc_t>
__device__ void add_variable_grad(const P& p, const Place& q, acc_t* grad, acc_t* tile_sum, acc_t* channel_buf,
                                  acc_t* workspace, int64_t t0, int t, acc_t v, bool warp_one_group) {
  if (p.deterministic) {
    if (!q.state_ok) return;
    if (channel_buf) channel_buf[(int64_t(q.c) * kT + t) * p.N + q.n] = v;
    else workspace[workspace_at(p, q, q.g, t0 + t, q.n)] += v;   // this thread alone adds here
    return;
  }
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

// The shared arrays of one round: the tile, dy per (channel, step), and per-warp partial sums.
template <typename acc_t>
struct BackwardShared {
  Tile<acc_t> tile;
  acc_t dy[kMaxChannels][kT + 1];       // dy; after the tile's sweep, d(delta)
  acc_t part_a[kMaxChannels][kT + 1];   // C·h sums, then dL/d(dt) sums
  acc_t part_b[kMaxChannels][kT + 1];   // dL/du sums
};

// One round: the gradients of the cpb channels at q.d0 of batch row q.b.
template <typename scalar_t, typename acc_t, bool kBvar, bool kCvar>
__device__ void backward_round(const ScanParams<scalar_t, acc_t>& p, const Place& q, BackwardShared<acc_t>& sh,
                               const StagedBC<acc_t>& staged, const ChannelGrads<acc_t>& channel) {
  Tile<acc_t>& tile = sh.tile;
  const acc_t a = q.state_ok ? p.A[q.d * p.N + q.n] : acc_t(0);
  const acc_t b_const = !kBvar && q.state_ok ? p.B[q.d * p.N + q.n] : acc_t(0);
  const acc_t c_const = !kCvar && q.state_ok ? p.C[q.d * p.N + q.n] : acc_t(0);
  const int warps_per_channel = (p.lpc + 31) / 32;
  // Whether this thread's warp holds channels of one group only (uniform within the warp).
  const int64_t warp_first = q.d0 + (threadIdx.x / 32) * 32 / p.lpc;
  const int64_t warp_last = min64(p.dim - 1, warp_first + (p.lpc < 32 ? 32 / p.lpc : 1) - 1);
  const bool warp_one_group = warp_first / p.per_group == warp_last / p.per_group;
  for (int64_t i = threadIdx.x; i < p.staged_groups * kT * p.N; i += blockDim.x) {   // the tile sums start at 0
    if (staged.db) staged.db[i] = acc_t(0);
    if (staged.dc) staged.dc[i] = acc_t(0);
  }
  // Thread c < cpb sums channel c's dD and d(delta_bias) over the steps, in order.
  acc_t G = 0, dA = 0, dB_const = 0, dC_const = 0, dD_mine = 0, dbias_mine = 0;
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
          if (q.n % q.width == 0) sh.part_a[q.warp_in_channel * p.cpb + q.c][t] = y;
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
            for (int w = 0; w < warps_per_channel; ++w) y += sh.part_a[w * p.cpb + c][t];
            const acc_t z = acc_t(p.z[at]), s = sigmoid(z);
            p.dz[at] = scalar_t(dy * y * s * (acc_t(1) + z * (acc_t(1) - s)));
            dy *= z * s;
          }
        }
        sh.dy[c][t] = dy;   // 0 outside the tile and the channels
      }
      __syncthreads();
      if (threadIdx.x < p.cpb)
        for (int t = 0; t < steps; ++t) dD_mine += sh.dy[threadIdx.x][t] * tile.u[threadIdx.x][t];
#pragma unroll
      for (int t = kT - 1; t >= 0; --t) {
        if (t < steps) {
          const acc_t dt = tile.dt[q.c][t], u = tile.u[q.c][t], dy = sh.dy[q.c][t];
          const acc_t bv = bc_value<kBvar>(p, q, staged.b, p.B, b_const, t0, t);
          const acc_t g = G + bc_value<kCvar>(p, q, staged.c, p.C, c_const, t0, t) * dy;
          const acc_t decay = vexp(dt * a);
          const acc_t carried = g * hist[t] * decay;
          dA += carried * dt;
          const acc_t ddt = lane_sum(carried * a + g * bv * u, q.width);
          const acc_t du = lane_sum(g * dt * bv, q.width);
          if (q.n % q.width == 0) {
            sh.part_a[q.warp_in_channel * p.cpb + q.c][t] = ddt;
            sh.part_b[q.warp_in_channel * p.cpb + q.c][t] = du;
          }
          if constexpr (kBvar)
            add_variable_grad(p, q, p.dB, staged.db, channel.db, p.ws_dB, t0, t, g * dt * u, warp_one_group);
          else dB_const += g * dt * u;
          if constexpr (kCvar)
            add_variable_grad(p, q, p.dC, staged.dc, channel.dc, p.ws_dC, t0, t, dy * hist[t + 1], warp_one_group);
          else dC_const += dy * hist[t + 1];
          G = decay * g;
        }
      }
      __syncthreads();
      if (staged.db || staged.dc) flush_variable_grads(p, q, staged, t0, steps);
      if (channel.db || channel.dc) flush_channel_grads(p, q, channel, t0, steps);
      for (int i = threadIdx.x; i < p.cpb * kT; i += blockDim.x) {
        const int c = i / kT, t = i % kT;
        const int64_t d = q.d0 + c;
        if (d >= p.dim || t >= steps) continue;   // sh.dy is 0 there
        acc_t ddt = 0, du = p.D[d] * sh.dy[c][t];
        for (int w = 0; w < warps_per_channel; ++w) {
          ddt += sh.part_a[w * p.cpb + c][t];
          du += sh.part_b[w * p.cpb + c][t];
        }
        const int64_t at = (q.b * p.dim + d) * p.L + t0 + t;
        const acc_t v = acc_t(p.delta[at]) + p.bias[d];
        const acc_t ddelta = p.softplus && v <= acc_t(20) ? ddt * sigmoid(v) : ddt;
        p.du[at] = scalar_t(du);
        p.ddelta[at] = scalar_t(ddelta);
        sh.dy[c][t] = ddelta;   // this thread alone read dy here
      }
      __syncthreads();
      if (threadIdx.x < p.cpb)
        for (int t = 0; t < steps; ++t) dbias_mine += sh.dy[threadIdx.x][t];
    }
  }
  if (q.state_ok) {
    add_channel_grad(p, p.dA, q.b, q.d * p.N + q.n, p.dim * p.N, dA);
    if constexpr (!kBvar) add_channel_grad(p, p.dB, q.b, q.d * p.N + q.n, p.dim * p.N, dB_const);
    if constexpr (!kCvar) add_channel_grad(p, p.dC, q.b, q.d * p.N + q.n, p.dim * p.N, dC_const);
  }
  if (threadIdx.x < p.cpb && q.d0 + threadIdx.x < p.dim) {
    add_channel_grad(p, p.dD, q.b, q.d0 + threadIdx.x, p.dim, dD_mine);
    add_channel_grad(p, p.dbias, q.b, q.d0 + threadIdx.x, p.dim, dbias_mine);
  }
}

template <typename scalar_t, typename acc_t, bool kBvar, bool kCvar>
__global__ void __launch_bounds__(256) scan_backward_kernel(const ScanParams<scalar_t, acc_t> p) {
  __shared__ BackwardShared<acc_t> sh;
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  acc_t* dynamic = reinterpret_cast<acc_t*>(dynamic_smem);
  const StagedBC<acc_t> staged = staged_bc<kBvar, kCvar>(p, dynamic);
  const ChannelGrads<acc_t> channel = channel_grads<kBvar, kCvar>(p, dynamic);
  for (int pass = 0; pass < p.passes; ++pass) {
    const Place q = place(p, pass);
    if (q.d0 >= p.dim) break;   // the row's last block may hold fewer rounds (uniform in the block)
    if (pass > 0) __syncthreads();   // the last round's readers of shared memory are done
    backward_round<scalar_t, acc_t, kBvar, kCvar>(p, q, sh, staged, channel);
  }
}

template <typename scalar_t>
void scan_backward_cuda(const ScanBackwardArgs& args) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const ScanArgs& a = args.in;
  const c10::cuda::CUDAGuard guard(a.u.device());
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  with_bc_forms(a.B_variable, a.C_variable, [&](auto Bv, auto Cv) {
    constexpr auto kernel = scan_backward_kernel<scalar_t, acc_t, decltype(Bv)::value, decltype(Cv)::value>;
    const size_t limit = shammie::cuda::dynamic_smem_limit<kernel>();
    LaunchShape shape = launch_shape(a.dstate, a.dim, a.groups);
    size_t channel_bytes = 0;
    if (deterministic) {
      shape = deterministic_shape<acc_t>(a, Bv, Cv, limit);
      channel_bytes = channel_grads_bytes<acc_t>(shape, a.dstate, Bv, Cv);
    }
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
    DeterministicWorkspace workspace;
    if (deterministic) workspace = use_deterministic_workspace(args, shape, p);
    // Summing dB / dC per tile in shared memory first saves global atomics only when a block holds
    // several channels (N ≤ 64: 4× fewer at N = 16).
    const StagingPlan plan = plan_staging<acc_t>(staged_size(shape, a.dstate), Bv, Cv,
                                                 !deterministic && shape.cpb >= 2, limit - channel_bytes);
    p.stage_bc = plan.stage_bc;
    p.grads_in_shared = plan.grads_in_shared;
    const size_t smem = shammie::cuda::allow_dynamic_smem<kernel>(plan.smem + channel_bytes, "selective_scan");
    kernel<<<num_blocks(a, shape), shape.threads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (deterministic) finish_deterministic_sums<acc_t>(args, shape, workspace);
  });
}

}  // namespace shammie::ssm::cuda
