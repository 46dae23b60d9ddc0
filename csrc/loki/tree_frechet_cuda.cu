// CUDA kernel of the tree Fréchet top-k (math in tree_frechet.h), on the current stream: one thread
// per sample, its sweep accumulators in global scratch laid out [node][sample] so that a warp's
// loads and stores coalesce while the plan's arrays are read uniformly across the warp (broadcast).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda/std/limits>

#include "loki/tree_frechet.h"

namespace shammie::tree_frechet::cuda {
namespace {

constexpr int kThreads = 128;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    topk_kernel(const scalar_t* __restrict__ probs, const int64_t* __restrict__ parent, const acc_t* __restrict__ edge,
                const acc_t* __restrict__ depth, const int64_t* __restrict__ obs, const acc_t* __restrict__ cand_t,
                const int64_t* __restrict__ cand_label, acc_t* __restrict__ A, acc_t* __restrict__ Bq,
                acc_t* __restrict__ top_v, int64_t* __restrict__ top_i, scalar_t* __restrict__ values,
                int64_t* __restrict__ indices, int64_t batch, int64_t K, int64_t M, int64_t J, int64_t k) {
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= batch) return;
  const int64_t S = batch;  // stride between nodes in the scratch
  const acc_t depth0 = depth[0];
  acc_t froot = 0;
  for (int64_t j = 0; j < K; ++j) {
    const acc_t p = acc_t(probs[s * K + j]);
    const int64_t pos = obs[j];
    const acc_t dep = depth[pos], d = dep - depth0;
    A[pos * S + s] += p;
    Bq[pos * S + s] += p * dep;
    froot += p * d * d;
  }
  for (int64_t i = M - 1; i >= 1; --i) {
    A[parent[i] * S + s] += A[i * S + s];
    Bq[parent[i] * S + s] += Bq[i * S + s];
  }
  for (int64_t r = 0; r < k; ++r) {
    top_v[r * S + s] = ::cuda::std::numeric_limits<acc_t>::infinity();
    top_i[r * S + s] = ::cuda::std::numeric_limits<int64_t>::max();
  }
  const acc_t total = A[s];
  A[s] = Bq[s] - depth0 * total;
  Bq[s] = froot;
  for (int64_t i = 0; i < M; ++i) {
    acc_t f = Bq[i * S + s], g = A[i * S + s];
    if (i > 0) {
      const int64_t a = parent[i];
      reroot(Bq[a * S + s], A[a * S + s], g, f, depth[a], edge[i], total, f, g);
      A[i * S + s] = g;
      Bq[i * S + s] = f;
    }
    for (int64_t j = 0; j < J; ++j) {
      const int64_t label = cand_label[i * J + j];
      if (label < 0) break;
      topk_insert(top_v + s, top_i + s, k, S, hang(f, g, total, cand_t[i * J + j]), label);
    }
  }
  for (int64_t r = 0; r < k; ++r) {
    values[s * k + r] = scalar_t(top_v[r * S + s]);
    indices[s * k + r] = top_i[r * S + s];
  }
}

void topk_cuda(const Args& a) {
  const c10::cuda::CUDAGuard guard(a.probs.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.probs.scalar_type(), "tree_frechet_topk_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = a.probs.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor A = at::zeros({a.nodes, a.batch}, acc_opts), Bq = at::zeros({a.nodes, a.batch}, acc_opts);
    at::Tensor top_v = at::empty({a.k, a.batch}, acc_opts);
    at::Tensor top_i = at::empty({a.k, a.batch}, a.probs.options().dtype(at::kLong));
    const unsigned blocks = static_cast<unsigned>((a.batch + kThreads - 1) / kThreads);
    topk_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        a.probs.const_data_ptr<scalar_t>(), a.parent.const_data_ptr<int64_t>(), a.edge.const_data_ptr<acc_t>(),
        a.depth.const_data_ptr<acc_t>(), a.obs_pos.const_data_ptr<int64_t>(), a.cand_t.const_data_ptr<acc_t>(),
        a.cand_label.const_data_ptr<int64_t>(), A.mutable_data_ptr<acc_t>(), Bq.mutable_data_ptr<acc_t>(),
        top_v.mutable_data_ptr<acc_t>(), top_i.mutable_data_ptr<int64_t>(), a.values.mutable_data_ptr<scalar_t>(),
        a.indices.mutable_data_ptr<int64_t>(), a.batch, a.num_obs, a.nodes, a.per_node, a.k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace shammie::tree_frechet::cuda

TORCH_LIBRARY_IMPL(shammie, CUDA, m) {
  m.impl("tree_frechet_topk", [](const at::Tensor& probs, const at::Tensor& parent, const at::Tensor& edge,
                                 const at::Tensor& depth, const at::Tensor& obs_pos, const at::Tensor& cand_t,
                                 const at::Tensor& cand_label, int64_t k) {
    return shammie::tree_frechet::topk(probs, parent, edge, depth, obs_pos, cand_t, cand_label, k,
                                       shammie::tree_frechet::cuda::topk_cuda);
  });
}
