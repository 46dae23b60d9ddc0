// The Monarch product as two batched GEMMs (math in monarch.h), for any device: stage 1 writes u
// straight into its (M, k·q) layout through a strided output view; the butterfly shuffle and the
// output permutation are one copy each. On CUDA this runs on cuBLAS's tensor cores, which the
// fused kernel (monarch_forward.cu) does not use; that kernel keeps the small token counts, where
// four launches cost more than one.
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>

#include "common/impl_override.h"
#include "monarch/monarch.h"

namespace shammie::monarch {
namespace {

// u = blockdiag(W1)·x for every token, as (M, k·q).
at::Tensor stage_one(const Dims& d, const at::Tensor& x, const at::Tensor& w1) {
  at::Tensor u = at::empty({d.tokens, d.mid()}, x.options());
  const at::Tensor x_blocks = x.view({d.tokens, d.k, d.p}).transpose(0, 1);   // (k, M, p)
  at::Tensor u_blocks = u.view({d.tokens, d.k, d.q}).transpose(0, 1);      // (k, M, q), a view of u
  at::bmm_out(u_blocks, x_blocks, w1.transpose(1, 2));
  return u;
}

// z_c[a] = u[a·l + c], as (l, M, r) contiguous.
at::Tensor shuffle(const Dims& d, const at::Tensor& u) {
  return u.view({d.tokens, d.r, d.l}).permute({2, 0, 1}).contiguous();
}

}  // namespace

Impl chosen_impl(const Dims& d, bool cuda) {
  if (const std::optional<int> forced = impl_override("SHAMMIE_MONARCH_IMPL", {"kernel", "gemm", "dense"}))
    return static_cast<Impl>(*forced);
  // CPU: the kernels beat MKL's batched GEMMs at every measured shape (benchmarks/RESULTS.md).
  return cuda && d.tokens >= kGemmMinTokensCuda ? Impl::kGemm : Impl::kKernel;
}

void forward_gemm(const ForwardArgs& args) {
  const Dims d = args.dims;
  const at::Tensor z = shuffle(d, stage_one(d, args.x, args.w1));
  const at::Tensor v = at::bmm(z, args.w2.transpose(1, 2));            // (l, M, s)
  args.y.view({d.tokens, d.s, d.l}).permute({2, 0, 1}).copy_(v);       // y[m·l + c] = v_c[m]
}

void backward_gemm(const BackwardArgs& args) {
  const Dims d = args.dims;
  const at::Tensor z = shuffle(d, stage_one(d, args.x, args.w1));      // recomputed, (l, M, r)
  const at::Tensor grad_v = args.grad_y.view({d.tokens, d.s, d.l}).permute({2, 0, 1}).contiguous();
  at::Tensor grad_w2 = args.grad_w2, grad_w1 = args.grad_w1;           // handles to the outputs
  at::bmm_out(grad_w2, grad_v.transpose(1, 2), z);                     // (l, s, r)
  const at::Tensor grad_z = at::bmm(grad_v, args.w2);                  // (l, M, r)
  at::Tensor grad_u = at::empty({d.tokens, d.mid()}, args.x.options());
  grad_u.view({d.tokens, d.r, d.l}).copy_(grad_z.permute({1, 2, 0}));  // undo the shuffle
  const at::Tensor grad_u_blocks = grad_u.view({d.tokens, d.k, d.q}).transpose(0, 1);   // (k, M, q)
  at::bmm_out(grad_w1, grad_u_blocks.transpose(1, 2), args.x.view({d.tokens, d.k, d.p}).transpose(0, 1));
  at::Tensor grad_x_blocks = args.grad_x.view({d.tokens, d.k, d.p}).transpose(0, 1);   // (k, M, p) view
  at::bmm_out(grad_x_blocks, grad_u_blocks, args.w1);
}

}  // namespace shammie::monarch
