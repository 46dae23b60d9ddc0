// CUDA backward of the Monarch product (math in monarch.h), on the current stream:
//  1. data kernel, one block per tile of tokens: recompute u, then
//       grad u[a·l + c] = Σ_m W2[c, m, a] · grad y[m·l + c]     (shuffle folded into indexing)
//       grad x[i·p + j] = Σ_a W1[i, a, j] · grad u[i·q + a]
//     with u and grad u in shared memory, and saved (fp32, tokens × k·q) for step 2;
//  2. weight kernels: each (column, token split) thread sums its split's share, coalesced along
//     x's and grad y's rows; the splits are then summed (deterministic, no atomics).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "monarch/monarch_cuda.cuh"

namespace shammie::monarch::cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_data_kernel(Dims d, const scalar_t* __restrict__ x, int64_t x_row,
                         const scalar_t* __restrict__ gy, int64_t gy_row,
                         const scalar_t* __restrict__ w1, const scalar_t* __restrict__ w2,
                         scalar_t* __restrict__ gx, int64_t gx_row, int64_t tile, int G_u,
                         int G_gu, acc_t* __restrict__ u_saved, acc_t* __restrict__ gu_saved,
                         bool on_chip) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t t0 = int64_t(blockIdx.x) * tile;
  const int64_t tokens = std::min<int64_t>(tile, d.tokens - t0);
  const int64_t mid = d.mid();
  // Work in shared memory when it fits, else directly in the saved rows of this tile.
  acc_t* u = on_chip ? reinterpret_cast<acc_t*>(shared_bytes) : u_saved + t0 * mid;
  acc_t* gu = on_chip ? u + tile * mid : gu_saved + t0 * mid;

  tile_u(d, x, x_row, w1, t0, tokens, G_u, u);
  group_dots<acc_t>(
      tokens, d.l, d.r, d.s, G_gu,
      [&](int64_t t, int64_t c, int64_t m) {
        return acc_t(gy[(t0 + t) * gy_row + y_index_of_v(c, m, d.l)]);
      },
      [&](int64_t c, int64_t a, int64_t m) { return acc_t(w2[(c * d.s + m) * d.r + a]); },
      [&](int64_t t, int64_t c, int64_t a, acc_t v) { gu[t * mid + u_index_of_z(c, a, d.l)] = v; });
  __syncthreads();

  if (on_chip) {
    for (int64_t e = threadIdx.x; e < tokens * mid; e += blockDim.x) {
      u_saved[t0 * mid + e] = u[e];
      gu_saved[t0 * mid + e] = gu[e];
    }
  }
  const int64_t n = d.n();
  for (int64_t e = threadIdx.x; e < tokens * n; e += blockDim.x) {
    const int64_t t = e / n, col = e % n, i = col / d.p, j = col % d.p;
    acc_t acc = 0;
    for (int64_t a = 0; a < d.q; ++a) acc += acc_t(w1[(i * d.q + a) * d.p + j]) * gu[t * mid + i * d.q + a];
    gx[(t0 + t) * gx_row + col] = scalar_t(acc);
  }
}

// Weight gradients as a reduction over tokens: for each output column `col`, chunks of kChunk values
// of a (grid.y, striding when there are more than 65,535 chunks) and one token split (grid.z),
// partial[split] gets Σ_{t in split} coef(t, col, a) · value(t, col). Threads run along columns, so
// the loads of x or grad y are coalesced.
template <typename acc_t, typename Terms>
__global__ void __launch_bounds__(kThreads)
    weight_grad_kernel(Terms terms, int64_t columns, int64_t outs, int64_t tokens, int64_t split_tokens) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= columns) return;
  const int64_t t_begin = int64_t(blockIdx.z) * split_tokens;
  const int64_t t_end = std::min(tokens, t_begin + split_tokens);
  for (int64_t a0 = int64_t(blockIdx.y) * kChunk; a0 < outs; a0 += int64_t(gridDim.y) * kChunk) {
    const int n_a = int(std::min<int64_t>(kChunk, outs - a0));
    acc_t acc[kChunk];
#pragma unroll
    for (int a = 0; a < kChunk; ++a) acc[a] = acc_t(0);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const acc_t v = terms.value(t, col);
#pragma unroll
      for (int a = 0; a < kChunk; ++a)
        if (a < n_a) acc[a] += terms.coef(t, col, a0 + a) * v;
    }
#pragma unroll
    for (int a = 0; a < kChunk; ++a)
      if (a < n_a) terms.store(blockIdx.z, col, a0 + a, acc[a]);
  }
}

// grad W1[i, a, j] = Σ_t grad u[t, i·q + a] · x[t, i·p + j]; columns are i·p + j.
template <typename scalar_t, typename acc_t>
struct GradW1Terms {
  Dims d;
  const scalar_t* x;
  int64_t x_row;
  const acc_t* gu;
  acc_t* partial;  // [split][k][q][p]
  __device__ acc_t value(int64_t t, int64_t col) const { return acc_t(x[t * x_row + col]); }
  __device__ acc_t coef(int64_t t, int64_t col, int64_t a) const {
    return gu[t * d.mid() + (col / d.p) * d.q + a];
  }
  __device__ void store(int64_t split, int64_t col, int64_t a, acc_t v) const {
    const int64_t i = col / d.p, j = col % d.p;
    partial[split * d.k * d.q * d.p + (i * d.q + a) * d.p + j] = v;
  }
};

// grad W2[c, m, a] = Σ_t grad y[t, m·l + c] · u[t, a·l + c]; columns are y's, m·l + c.
template <typename scalar_t, typename acc_t>
struct GradW2Terms {
  Dims d;
  const scalar_t* gy;
  int64_t gy_row;
  const acc_t* u;
  acc_t* partial;  // [split][l][s][r]
  __device__ acc_t value(int64_t t, int64_t col) const { return acc_t(gy[t * gy_row + col]); }
  __device__ acc_t coef(int64_t t, int64_t col, int64_t a) const {
    return u[t * d.mid() + u_index_of_z(col % d.l, a, d.l)];
  }
  __device__ void store(int64_t split, int64_t col, int64_t a, acc_t v) const {
    const int64_t c = col % d.l, m = col / d.l;
    partial[split * d.l * d.s * d.r + (c * d.s + m) * d.r + a] = v;
  }
};

// Sums partial (splits × weight) over the splits into grad (the weight's dtype).
template <typename acc_t, typename Terms>
void launch_weight_grad(const Terms& terms, const at::Tensor& partial, int64_t columns,
                        int64_t outs, int64_t tokens, int64_t split_tokens, const at::Tensor& grad,
                        cudaStream_t stream) {
  const int64_t chunks = std::min<int64_t>((outs + kChunk - 1) / kChunk, 65535);  // grid.y limit
  const dim3 grid((columns + kThreads - 1) / kThreads, chunks, partial.size(0));
  weight_grad_kernel<acc_t><<<grid, kThreads, 0, stream>>>(terms, columns, outs, tokens, split_tokens);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grad.copy_(at::sum(partial, 0));
}

void backward_cuda(const BackwardArgs& args) {
  const Dims d = args.dims;
  const c10::cuda::CUDAGuard guard(args.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = multiprocessors(args.x.get_device());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(),
                                  "blockdiag_butterfly_multiply_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = args.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t per_token = 2 * d.mid() * int64_t(sizeof(acc_t));
    const int64_t tile = tile_tokens(d.tokens, sms, per_token);
    const int64_t blocks = token_blocks(d.tokens, tile);
    const bool on_chip = tile * per_token <= kSharedBytes;
    at::Tensor u = at::empty({d.tokens, d.mid()}, acc_options);
    at::Tensor gu = at::empty({d.tokens, d.mid()}, acc_options);
    backward_data_kernel<scalar_t, acc_t><<<blocks, kThreads, on_chip ? tile * per_token : 0, stream>>>(
        d, args.x.const_data_ptr<scalar_t>(), args.x.stride(0), args.grad_y.const_data_ptr<scalar_t>(),
        args.grad_y.stride(0), args.w1.const_data_ptr<scalar_t>(), args.w2.const_data_ptr<scalar_t>(),
        args.grad_x.mutable_data_ptr<scalar_t>(), args.grad_x.stride(0), tile, group_size(d.p),
        group_size(d.s), u.mutable_data_ptr<acc_t>(), gu.mutable_data_ptr<acc_t>(), on_chip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // Token splits: enough (column block × split) blocks to fill the device.
    const int64_t col_blocks_w1 = (d.n() + kThreads - 1) / kThreads * ((d.q + kChunk - 1) / kChunk);
    const int64_t col_blocks_w2 = (d.out() + kThreads - 1) / kThreads * ((d.r + kChunk - 1) / kChunk);
    const int64_t want = 4 * int64_t(sms) / std::max<int64_t>(1, std::min(col_blocks_w1, col_blocks_w2));
    const int64_t splits = std::clamp<int64_t>(want, 1, std::min<int64_t>(d.tokens, 65535));
    const int64_t split_tokens = (d.tokens + splits - 1) / splits;

    at::Tensor partial_w1 = at::empty({splits, d.k, d.q, d.p}, acc_options);
    launch_weight_grad<acc_t>(
        GradW1Terms<scalar_t, acc_t>{d, args.x.const_data_ptr<scalar_t>(), args.x.stride(0),
                                     gu.const_data_ptr<acc_t>(), partial_w1.mutable_data_ptr<acc_t>()},
        partial_w1, d.n(), d.q, d.tokens, split_tokens, args.grad_w1, stream);
    at::Tensor partial_w2 = at::empty({splits, d.l, d.s, d.r}, acc_options);
    launch_weight_grad<acc_t>(
        GradW2Terms<scalar_t, acc_t>{d, args.grad_y.const_data_ptr<scalar_t>(), args.grad_y.stride(0),
                                     u.const_data_ptr<acc_t>(), partial_w2.mutable_data_ptr<acc_t>()},
        partial_w2, d.out(), d.r, d.tokens, split_tokens, args.grad_w2, stream);
  });
}

}  // namespace
}  // namespace shammie::monarch::cuda

TORCH_LIBRARY_IMPL(shammie, CUDA, m) {
  m.impl("blockdiag_butterfly_multiply_backward",
         [](const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
           return shammie::monarch::backward(gy, x, w1, w2, shammie::monarch::cuda::backward_cuda);
         });
}
