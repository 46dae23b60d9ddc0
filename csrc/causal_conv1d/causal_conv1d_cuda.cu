// CUDA kernels of causal conv1d (math in causal_conv1d.h), on the current stream:
//   forward   one thread per output (b, d, t), t fastest so loads and stores coalesce;
//   backward  grad pre (recomputed) to fp32 scratch, then grad x by the transposed window, then
//             one block per (channel, tap) reduces grad weight (and grad bias) over (batch, time)
//             through shared memory: deterministic, no atomics;
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

// gp[(b·dim + d)·length + t] = grad_out · activation'(pre)
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grad_pre_kernel(const scalar_t* __restrict__ x, Strides xs, const scalar_t* __restrict__ gy, Strides gs,
                    const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                    const int64_t* __restrict__ seq_idx, acc_t* __restrict__ gp, int64_t batch, int64_t dim,
                    int64_t length, int64_t width, bool silu) {
  const int64_t total = batch * dim * length;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i % length, row = i / length, d = row % dim, b = row / dim;
    const acc_t pre = pre_activation<scalar_t, acc_t>(x + b * xs.batch + d * xs.dim, xs.time, weight, bias,
                                                      seq_row(seq_idx, b, length), d, width, t);
    gp[i] = acc_t(gy[b * gs.batch + d * gs.dim + t * gs.time]) * activation_grad(pre, silu);
  }
}

// grad x[t] = Σ_w weight[w] · gp[t + lag(w)]  (taps past the end, or into another sequence, read nothing)
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grad_x_kernel(const acc_t* __restrict__ gp, const scalar_t* __restrict__ weight,
                  const int64_t* __restrict__ seq_idx, scalar_t* __restrict__ gx, int64_t batch, int64_t dim,
                  int64_t length, int64_t width) {
  const int64_t total = batch * dim * length;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i % length, row = i / length, d = row % dim;
    const int64_t* seq = seq_row(seq_idx, row / dim, length);
    acc_t acc = 0;
    for (int64_t w = 0; w < width; ++w) {
      const int64_t src = t + lag(w, width);   // the output whose tap w reads x[t]
      if (src < length && same_sequence(seq, t, src)) acc += acc_t(weight[d * width + w]) * gp[row * length + src];
    }
    gx[i] = scalar_t(acc);
  }
}

// Block d·(width + 1) + w: grad weight[d, w] = Σ_{b,t} gp[b, d, t] · x[b, d, t − lag(w)]; block (d, width) is
// grad bias[d] = Σ_{b,t} gp[b, d, t].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grad_weight_kernel(const acc_t* __restrict__ gp, const scalar_t* __restrict__ x, Strides xs,
                       const int64_t* __restrict__ seq_idx, scalar_t* __restrict__ grad_weight,
                       scalar_t* __restrict__ grad_bias, int64_t batch, int64_t dim, int64_t length, int64_t width) {
  __shared__ acc_t partial[kThreads];
  const int64_t d = blockIdx.x / (width + 1), w = blockIdx.x % (width + 1);
  const bool is_bias = w == width;
  const int64_t lag_w = is_bias ? 0 : lag(w, width);
  acc_t acc = 0;
  for (int64_t i = threadIdx.x; i < batch * length; i += blockDim.x) {
    const int64_t b = i / length, t = i % length;
    const acc_t g = gp[(b * dim + d) * length + t];
    if (is_bias) {
      acc += g;
    } else if (t >= lag_w && same_sequence(seq_row(seq_idx, b, length), t - lag_w, t)) {
      acc += g * acc_t(x[b * xs.batch + d * xs.dim + (t - lag_w) * xs.time]);
    }
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (is_bias) grad_bias[d] = scalar_t(partial[0]);
    else grad_weight[d * width + w] = scalar_t(partial[0]);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "causal_conv1d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t total = a.batch * a.dim * a.length;
    at::Tensor gp = at::empty({total}, a.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    grad_pre_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        a.x.const_data_ptr<scalar_t>(), strides_of(a.x), args.grad_out.const_data_ptr<scalar_t>(),
        strides_of(args.grad_out), a.weight.const_data_ptr<scalar_t>(), bias_ptr<scalar_t>(a.bias),
        seq_ptr(a.seq_idx), gp.mutable_data_ptr<acc_t>(), a.batch, a.dim, a.length, a.width, a.silu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_x_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        gp.const_data_ptr<acc_t>(), a.weight.const_data_ptr<scalar_t>(), seq_ptr(a.seq_idx),
        args.grad_x.mutable_data_ptr<scalar_t>(), a.batch, a.dim, a.length, a.width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // One block per weight and bias entry, on grid.x (grid.y would cap the width at 65,534).
    const int64_t entries = a.dim * (a.width + 1);
    SHAMMIE_CHECK(entries <= INT32_MAX, "causal_conv1d_fn: dim · (width + 1) = ", entries,
                " is too large for one CUDA launch");
    grad_weight_kernel<scalar_t, acc_t><<<entries, kThreads, 0, stream>>>(
        gp.const_data_ptr<acc_t>(), a.x.const_data_ptr<scalar_t>(), strides_of(a.x), seq_ptr(a.seq_idx),
        args.grad_weight.mutable_data_ptr<scalar_t>(), args.grad_bias.mutable_data_ptr<scalar_t>(), a.batch, a.dim,
        a.length, a.width);
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
