// CUDA forward of the Monarch product (math in monarch.h): one block per tile of tokens;
// u = W1·x goes to shared memory (global scratch only when k·q is too wide for it), then each
// thread writes outputs y[m·l + c] = Σ_a W2[c, m, a] · u[a·l + c], the shuffle folded into the
// indexing. Launched on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "monarch/monarch_cuda.cuh"

namespace shammie::monarch::cuda {
namespace {

// w2p is W2 permuted to [a][m][c]: w2p[a·(l·s) + m·l + c] = W2[c, m, a], so that threads with
// consecutive outputs o = m·l + c read consecutive weights.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Dims d, const scalar_t* __restrict__ x, int64_t x_row,
                   const scalar_t* __restrict__ w1, const scalar_t* __restrict__ w2p,
                   scalar_t* __restrict__ y, int64_t y_row, int64_t tile, int G,
                   acc_t* __restrict__ scratch) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t t0 = int64_t(blockIdx.x) * tile;
  const int64_t tokens = std::min<int64_t>(tile, d.tokens - t0);
  acc_t* u = scratch ? scratch + int64_t(blockIdx.x) * tile * d.mid()
                     : reinterpret_cast<acc_t*>(shared_bytes);
  tile_u(d, x, x_row, w1, t0, tokens, G, u);
  __syncthreads();
  const int64_t width = d.out();
  for (int64_t e = threadIdx.x; e < tokens * width; e += blockDim.x) {
    const int64_t t = e / width, o = e % width;
    const int64_t c = o % d.l;  // o = y_index_of_v(c, m, l) = m·l + c
    acc_t acc = 0;
    for (int64_t a = 0; a < d.r; ++a)
      acc += acc_t(w2p[a * width + o]) * u[t * d.mid() + u_index_of_z(c, a, d.l)];
    y[(t0 + t) * y_row + o] = scalar_t(acc);
  }
}

void forward_cuda(const ForwardArgs& args) {
  const Dims d = args.dims;
  const c10::cuda::CUDAGuard guard(args.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = multiprocessors(args.x.get_device());
  const at::Tensor w2p = args.w2.permute({2, 1, 0}).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(),
                                  "blockdiag_butterfly_multiply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t per_token = d.mid() * int64_t(sizeof(acc_t));
    const int64_t tile = tile_tokens(d.tokens, sms, per_token);
    const int64_t blocks = token_blocks(d.tokens, tile);
    const bool on_chip = tile * per_token <= kSharedBytes;
    at::Tensor scratch;
    if (!on_chip)
      scratch = at::empty({blocks * tile * d.mid()}, args.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    forward_kernel<scalar_t, acc_t><<<blocks, kThreads, on_chip ? tile * per_token : 0, stream>>>(
        d, args.x.const_data_ptr<scalar_t>(), args.x.stride(0), args.w1.const_data_ptr<scalar_t>(),
        w2p.const_data_ptr<scalar_t>(), args.y.mutable_data_ptr<scalar_t>(), args.y.stride(0), tile,
        group_size(d.p), on_chip ? nullptr : scratch.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace shammie::monarch::cuda

TORCH_LIBRARY_IMPL(shammie, CUDA, m) {
  m.impl("blockdiag_butterfly_multiply",
         [](const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
           return shammie::monarch::forward(x, w1, w2, shammie::monarch::cuda::forward_cuda);
         });
}
