// CUDA kernel of selective_state_update (math in ssm_math.h), on the current stream: `lanes` threads
// per channel (batch, head, dim) (N rounded up to a power of two, at most a warp), each stepping the
// states n ≡ lane (mod lanes), so that a warp's loads and stores of a state row are contiguous (the
// first version gave each thread a whole row: 512-byte strides between neighbouring threads at
// N = 128); y is a shuffle sum over the channel's lanes. The state is updated in place.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_capture.h"
#include "selective_scan/selective_state_update.h"
#include "selective_scan/ssm_math.h"

namespace shammie::ssm::cuda {
namespace {

constexpr int kThreads = 128;

struct StateStrides {
  int64_t b, h, p, n;
};

template <typename scalar_t, typename state_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    state_update_kernel(state_t* state, StateStrides ss, const scalar_t* __restrict__ x,
                        const scalar_t* __restrict__ dt, const scalar_t* __restrict__ z, const acc_t* __restrict__ A,
                        const scalar_t* __restrict__ B, const scalar_t* __restrict__ C, const acc_t* __restrict__ D,
                        const acc_t* __restrict__ dt_bias, const int64_t* __restrict__ state_rows, int64_t cache_rows,
                        scalar_t* __restrict__ out, int64_t batch, int64_t heads, int64_t dim, int64_t dstate,
                        int64_t groups, bool softplus, int lanes) {
  const int64_t rows = batch * heads * dim, heads_per_group = heads / groups;
  const int lane = threadIdx.x % lanes;
  // The row's lanes within the warp: every branch below is uniform over them.
  const unsigned mask = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1) << ((threadIdx.x % 32) / lanes * lanes);
  const int64_t rows_per_block = kThreads / lanes;
  for (int64_t row = int64_t(blockIdx.x) * rows_per_block + threadIdx.x / lanes; row < rows;
       row += int64_t(gridDim.x) * rows_per_block) {
    const int64_t p = row % dim, h = (row / dim) % heads, b = row / (dim * heads), g = h / heads_per_group;
    const int64_t channel = h * dim + p;
    const int64_t state_row = state_rows ? state_rows[b] : b;
    if (state_row < 0 || state_row >= cache_rows) {   // a padding element (or, unchecked in a capture, no row)
      if (lane == 0) out[row] = scalar_t(0);
      continue;
    }
    const acc_t xv = acc_t(x[row]);
    const acc_t step = step_size(acc_t(dt[row]), dt_bias[channel], softplus);
    const acc_t* a_row = A + channel * dstate;
    const scalar_t* b_row = B + (b * groups + g) * dstate;
    const scalar_t* c_row = C + (b * groups + g) * dstate;
    state_t* s = state + state_row * ss.b + h * ss.h + p * ss.p;
    acc_t y = 0;
    for (int64_t n = lane; n < dstate; n += lanes) {
      const acc_t hn = state_step(acc_t(s[n * ss.n]), step, a_row[n], acc_t(b_row[n]), xv);
      s[n * ss.n] = state_t(hn);
      y += hn * acc_t(c_row[n]);
    }
    for (int offset = lanes / 2; offset > 0; offset /= 2) y += __shfl_xor_sync(mask, y, offset, lanes);
    if (lane == 0) {
      y += D[channel] * xv;
      out[row] = scalar_t(z ? gate(y, acc_t(z[row])) : y);
    }
  }
}

void state_update_cuda(const StateUpdateArgs& a) {
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = a.batch * a.heads * a.dim;
  int lanes = 1;
  while (lanes < a.dstate && lanes < 32) lanes *= 2;
  const int64_t rows_per_block = kThreads / lanes;
  const unsigned blocks = static_cast<unsigned>(
      std::clamp<int64_t>((rows + rows_per_block - 1) / rows_per_block, 1, int64_t(1) << 20));
  const StateStrides ss{a.state.stride(0), a.state.stride(1), a.state.stride(2), a.state.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "selective_state_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto* state) {
      using state_t = std::remove_pointer_t<decltype(state)>;
      state_update_kernel<scalar_t, state_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          state, ss, a.x.const_data_ptr<scalar_t>(), a.dt.const_data_ptr<scalar_t>(),
          a.z ? a.z->const_data_ptr<scalar_t>() : nullptr, a.A.const_data_ptr<acc_t>(), a.B.const_data_ptr<scalar_t>(),
          a.C.const_data_ptr<scalar_t>(), a.D.const_data_ptr<acc_t>(), a.dt_bias.const_data_ptr<acc_t>(),
          a.state_rows ? a.state_rows->const_data_ptr<int64_t>() : nullptr, a.state.size(0),
          a.out.mutable_data_ptr<scalar_t>(), a.batch, a.heads, a.dim, a.dstate, a.groups, a.softplus, lanes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (a.state.scalar_type() == a.x.scalar_type()) launch(a.state.mutable_data_ptr<scalar_t>());
    else launch(a.state.mutable_data_ptr<float>());
  });
}

}  // namespace
}  // namespace shammie::ssm::cuda

TORCH_LIBRARY_IMPL(shammie, CUDA, m) {
  m.impl("selective_state_update",
         [](const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
            const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
            const std::optional<at::Tensor>& dt_bias, bool dt_softplus, const std::optional<at::Tensor>& rows) {
           return shammie::ssm::selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, rows,
                                                      shammie::ssm::cuda::state_update_cuda,
                                                      /*values_on_host=*/!shammie::cuda::stream_is_capturing());
         });
}
