// CUDA kernels of causal conv1d (math in causal_conv1d.h), on the current stream:
//   forward   one thread per output (b, d, t), t fastest so loads and stores coalesce;
//   backward  one block per (row, chunk of time): grad pre (recomputed) in shared memory, grad x
//             by the transposed window, and the chunk's grad weight / grad bias partial sums, which
//             a second kernel adds per (channel, tap) in a fixed order: deterministic, no atomics
//             (the first version sent grad pre through global memory in fp32 and read it W + 2 times);
//   update    one thread per (b, d) row: the window over [conv_state, x], then the state shift.
#include "common/errors.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "causal_conv1d/causal_conv1d.h"
#include "common/cuda_capture.h"
#include "common/cuda_smem.h"

namespace shammie::conv1d::cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, int64_t(1) << 20));
}

// pre[t] for channel d of one row; bias may be null; seq (the row's seq_idx) null without packing.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t pre_activation(const scalar_t* __restrict__ x_row, int64_t x_time,
                                                const scalar_t* __restrict__ weight,
                                                const scalar_t* __restrict__ bias, const int64_t* __restrict__ seq,
                                                int64_t d, int64_t width, int64_t t) {
  const scalar_t* w_row = weight + d * width;
  acc_t acc = bias ? acc_t(bias[d]) : acc_t(0);
  for (int64_t w = 0; w < width; ++w) {
    const int64_t src = t - lag(w, width);
    if (src >= 0 && same_sequence(seq, src, t)) acc += acc_t(w_row[w]) * acc_t(x_row[src * x_time]);
  }
  return acc;
}

// The seq_idx row of batch b (null without packed sequences).
__device__ __forceinline__ const int64_t* seq_row(const int64_t* seq_idx, int64_t b, int64_t length) {
  return seq_idx ? seq_idx + b * length : nullptr;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, Strides xs, const scalar_t* __restrict__ weight,
                   const scalar_t* __restrict__ bias, const int64_t* __restrict__ seq_idx, scalar_t* __restrict__ out,
                   int64_t batch, int64_t dim, int64_t length, int64_t width, bool silu) {
  const int64_t total = batch * dim * length;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i % length, row = i / length, d = row % dim, b = row / dim;
    const acc_t pre = pre_activation<scalar_t, acc_t>(x + b * xs.batch + d * xs.dim, xs.time, weight, bias,
                                                      seq_row(seq_idx, b, length), d, width, t);
    out[i] = scalar_t(activate(pre, silu));
  }
}

// The backward, fused per (row b·dim + d, chunk of `chunk` steps starting at t0): stage the row's
// weights, x over [t0 − (W − 1), t0 + chunk + W − 1) and gp(t) = grad_out(t) · activation'(pre(t))
// over [t0, t0 + chunk + W − 1) in shared memory (pre recomputed; grad x inside the chunk reads gp up
// to W − 1 steps past it), write grad x for the chunk, and leave the chunk's partial grad weight and
// grad bias sums in scratch ((dim, width + 1, batch · chunks)), which a second kernel adds up per
// (channel, tap) in a fixed order. gp never leaves the chip, and the result is deterministic.
inline int64_t chunk_length(int64_t length) {   // a multiple of 32, at most 1024 (4 steps per thread)
  return std::clamp<int64_t>((length + 31) / 32 * 32, 32, 4 * kThreads);
}

template <typename acc_t>
size_t backward_smem_bytes(int64_t chunk, int64_t width) {   // weights, x window, gp window
  return static_cast<size_t>(width + (chunk + 2 * (width - 1)) + (chunk + width - 1)) * sizeof(acc_t);
}

// The sum over the block of each thread's v, in thread 0 (fixed order: deterministic).
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* warp_sums) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += warp_sums[w];
  __syncthreads();   // warp_sums is free again for the next call
  return total;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_chunk_kernel(const scalar_t* __restrict__ x, Strides xs, const scalar_t* __restrict__ gy, Strides gs,
                          const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                          const int64_t* __restrict__ seq_idx, scalar_t* __restrict__ gx, acc_t* __restrict__ partial,
                          int64_t batch, int64_t dim, int64_t length, int64_t width, int64_t chunk, int64_t chunks,
                          bool silu) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ acc_t warp_sums[kThreads / 32];
  const int64_t halo = width - 1;
  acc_t* w_s = reinterpret_cast<acc_t*>(smem);   // [width]
  acc_t* x_s = w_s + width;                      // [chunk + 2·halo]: x[t0 − halo + j]
  acc_t* gp_s = x_s + chunk + 2 * halo;          // [chunk + halo]: gp[t0 + i], 0 past the row's end
  const int64_t row = blockIdx.x / chunks, t0 = (blockIdx.x % chunks) * chunk;
  const int64_t b = row / dim, d = row % dim;
  const scalar_t* x_row = x + b * xs.batch + d * xs.dim;
  const scalar_t* gy_row = gy + b * gs.batch + d * gs.dim;
  const int64_t* seq = seq_row(seq_idx, b, length);
  for (int64_t w = threadIdx.x; w < width; w += blockDim.x) w_s[w] = acc_t(weight[d * width + w]);
  for (int64_t j = threadIdx.x; j < chunk + 2 * halo; j += blockDim.x) {
    const int64_t t = t0 - halo + j;
    x_s[j] = t >= 0 && t < length ? acc_t(x_row[t * xs.time]) : acc_t(0);
  }
  __syncthreads();
  const acc_t bias_d = bias ? acc_t(bias[d]) : acc_t(0);
  for (int64_t i = threadIdx.x; i < chunk + halo; i += blockDim.x) {
    const int64_t t = t0 + i;
    acc_t g = 0;
    if (t < length) {
      acc_t pre = bias_d;   // the forward's sum, in the forward's order (pre_activation)
      for (int64_t w = 0; w < width; ++w) {
        const int64_t src = t - lag(w, width);
        if (src >= 0 && same_sequence(seq, src, t)) pre += w_s[w] * x_s[i + halo - lag(w, width)];
      }
      g = acc_t(gy_row[t * gs.time]) * activation_grad(pre, silu);
    }
    gp_s[i] = g;
  }
  __syncthreads();
  // grad x[t] = Σ_w weight[w] · gp[t + lag(w)]: taps past the end, or into another sequence, read nothing.
  for (int64_t i = threadIdx.x; i < chunk && t0 + i < length; i += blockDim.x) {
    const int64_t t = t0 + i;
    acc_t acc = 0;
    for (int64_t w = 0; w < width; ++w) {
      const int64_t dst = t + lag(w, width);   // the output whose tap w reads x[t]
      if (dst < length && same_sequence(seq, t, dst)) acc += w_s[w] * gp_s[i + lag(w, width)];
    }
    gx[row * length + t] = scalar_t(acc);
  }
  // The chunk's share of grad weight[d, w] = Σ_t gp[t] · x[t − lag(w)] and (w = width) grad bias[d] = Σ_t gp[t].
  const int64_t pieces = batch * chunks, piece = b * chunks + blockIdx.x % chunks;
  for (int64_t w = 0; w <= width; ++w) {
    const int64_t lag_w = w < width ? lag(w, width) : 0;
    acc_t acc = 0;
    for (int64_t i = threadIdx.x; i < chunk && t0 + i < length; i += blockDim.x) {
      const int64_t t = t0 + i;
      if (w == width) acc += gp_s[i];
      else if (t >= lag_w && same_sequence(seq, t - lag_w, t)) acc += gp_s[i] * x_s[i + halo - lag_w];
    }
    acc = block_sum(acc, warp_sums);
    if (threadIdx.x == 0) partial[(d * (width + 1) + w) * pieces + piece] = acc;
  }
}

// Block d·(width + 1) + w: grad weight[d, w] (w < width) or grad bias[d] (w = width), the sum of the
// chunks' partials in order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const acc_t* __restrict__ partial, int64_t pieces, int64_t width,
                           scalar_t* __restrict__ grad_weight, scalar_t* __restrict__ grad_bias) {
  __shared__ acc_t warp_sums[kThreads / 32];
  const int64_t entry = blockIdx.x;
  acc_t acc = 0;
  for (int64_t i = threadIdx.x; i < pieces; i += blockDim.x) acc += partial[entry * pieces + i];
  acc = block_sum(acc, warp_sums);
  if (threadIdx.x == 0) {
    const int64_t d = entry / (width + 1), w = entry % (width + 1);
    if (w == width) grad_bias[d] = scalar_t(acc);
    else grad_weight[d * width + w] = scalar_t(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    update_kernel(const scalar_t* __restrict__ x, Strides xs, scalar_t* state, Strides ss,
                  const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                  const int64_t* __restrict__ state_rows, int64_t cache_rows,
                  const int64_t* __restrict__ cache_seqlens,
                  scalar_t* __restrict__ out, int64_t batch, int64_t dim,
                  int64_t steps, int64_t width, int64_t state_len, bool silu) {
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < batch * dim;
       row += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = row / dim, d = row % dim, state_row = state_rows ? state_rows[b] : b;
    if (state_row < 0 || state_row >= cache_rows) {   // a padding element (or, unchecked in a capture, no row)
      for (int64_t i = 0; i < steps; ++i) out[row * steps + i] = scalar_t(0);
      continue;
    }
    scalar_t* st = state + state_row * ss.batch + d * ss.dim;
    const scalar_t* xr = x + b * xs.batch + d * xs.dim;
    // seq = [conv_state (oldest first), x]; seq(j) for j < state_len + steps.
    const int64_t start = circular_start(cache_seqlens, b, state_len);
    auto seq = [&](int64_t j) {
      if (j >= state_len) return acc_t(xr[(j - state_len) * xs.time]);
      return acc_t(st[(cache_seqlens ? state_slot(start, j, state_len) : j) * ss.time]);
    };
    for (int64_t i = 0; i < steps; ++i) {
      acc_t acc = bias ? acc_t(bias[d]) : acc_t(0);
      for (int64_t w = 0; w < width; ++w) acc += acc_t(weight[d * width + w]) * seq(state_len + i - lag(w, width));
      out[row * steps + i] = scalar_t(activate(acc, silu));
    }
    if (cache_seqlens) {   // circular: x's last state_len steps go to their slots
      for (int64_t i = steps > state_len ? steps - state_len : 0; i < steps; ++i)
        st[state_slot(start, i, state_len) * ss.time] = xr[i * xs.time];
    } else {   // shift: new state[i] = seq(steps + i); increasing i only reads entries not yet written
      for (int64_t i = 0; i < state_len; ++i) st[i * ss.time] = scalar_t(seq(steps + i));
    }
  }
}

template <typename scalar_t>
const scalar_t* bias_ptr(const std::optional<at::Tensor>& bias) {
  return bias ? bias->const_data_ptr<scalar_t>() : nullptr;
}

const int64_t* seq_ptr(const std::optional<at::Tensor>& seq_idx) {
  return seq_idx ? seq_idx->const_data_ptr<int64_t>() : nullptr;
}

void forward_cuda(const ForwardArgs& a) {
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "causal_conv1d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<blocks_for(a.out.numel()), kThreads, 0, stream>>>(
        a.x.const_data_ptr<scalar_t>(), strides_of(a.x), a.weight.const_data_ptr<scalar_t>(), bias_ptr<scalar_t>(a.bias),
        seq_ptr(a.seq_idx), a.out.mutable_data_ptr<scalar_t>(), a.batch, a.dim, a.length, a.width, a.silu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_cuda(const BackwardArgs& args) {
  const ForwardArgs& a = args.forward;
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunk = chunk_length(a.length), chunks = (a.length + chunk - 1) / chunk;
  const int64_t blocks = a.batch * a.dim * chunks, entries = a.dim * (a.width + 1);
  SHAMMIE_CHECK(blocks <= INT32_MAX && entries <= INT32_MAX, "causal_conv1d_fn: batch · dim · ceil(seqlen / ",
                chunk, ") = ", blocks, " or dim · (width + 1) = ", entries, " is too large for one CUDA launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "causal_conv1d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({entries * a.batch * chunks}, a.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    constexpr auto kernel = backward_chunk_kernel<scalar_t, acc_t>;
    const size_t smem = shammie::cuda::allow_dynamic_smem<kernel>(backward_smem_bytes<acc_t>(chunk, a.width),
                                                                   "causal_conv1d_fn backward");
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        a.x.const_data_ptr<scalar_t>(), strides_of(a.x), args.grad_out.const_data_ptr<scalar_t>(),
        strides_of(args.grad_out), a.weight.const_data_ptr<scalar_t>(), bias_ptr<scalar_t>(a.bias),
        seq_ptr(a.seq_idx), args.grad_x.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), a.batch,
        a.dim, a.length, a.width, chunk, chunks, a.silu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reduce_partials_kernel<scalar_t, acc_t><<<static_cast<unsigned>(entries), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), a.batch * chunks, a.width, args.grad_weight.mutable_data_ptr<scalar_t>(),
        args.grad_bias.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void update_cuda(const UpdateArgs& a) {
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "causal_conv1d_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    update_kernel<scalar_t, acc_t><<<blocks_for(a.batch * a.dim), kThreads, 0, stream>>>(
        a.x.const_data_ptr<scalar_t>(), strides_of(a.x), a.conv_state.mutable_data_ptr<scalar_t>(),
        strides_of(a.conv_state), a.weight.const_data_ptr<scalar_t>(), bias_ptr<scalar_t>(a.bias),
        a.state_rows ? a.state_rows->const_data_ptr<int64_t>() : nullptr, a.conv_state.size(0),
        a.cache_seqlens ? a.cache_seqlens->const_data_ptr<int64_t>() : nullptr, a.out.mutable_data_ptr<scalar_t>(),
        a.batch, a.dim, a.steps, a.width, a.state_len, a.silu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace shammie::conv1d::cuda

TORCH_LIBRARY_IMPL(shammie, CUDA, m) {
  namespace conv1d = shammie::conv1d;
  m.impl("causal_conv1d", [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, bool silu,
                             const std::optional<at::Tensor>& seq) {
    return conv1d::forward(x, w, b, silu, seq, conv1d::cuda::forward_cuda);
  });
  m.impl("causal_conv1d_backward", [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                      const std::optional<at::Tensor>& b, bool silu,
                                      const std::optional<at::Tensor>& seq) {
    return conv1d::backward(g, x, w, b, silu, seq, conv1d::cuda::backward_cuda);
  });
  m.impl("causal_conv1d_update", [](const at::Tensor& x, const at::Tensor& state, const at::Tensor& w,
                                    const std::optional<at::Tensor>& b, bool silu,
                                    const std::optional<at::Tensor>& rows, const std::optional<at::Tensor>& lengths) {
    return conv1d::update(x, state, w, b, silu, rows, lengths, conv1d::cuda::update_cuda,
                          /*values_on_host=*/!shammie::cuda::stream_is_capturing());
  });
}
