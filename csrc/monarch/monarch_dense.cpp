// The Monarch product as two plain GEMMs (math in monarch.h), for any device: both block-diagonal
// factors are expanded into dense matrices, and the butterfly shuffle and the output permutation go
// into the second one's rows and columns, so no copy of activations remains between or after the
// GEMMs:
//   y = x · D1ᵀ · D2ᵀ,   D1 = blockdiag(W1): (k·q, n), rows in u's order (i·q + a);
//                        D2: (l·s, k·q), D2[m·l + c, a·l + c] = W2[c, m, a] (zero where the c differ).
// Each is a diagonal of a zero 4-D tensor, so building one is a fill and a strided copy. The expansion
// costs k (resp. l) times the factor's multiply-adds, which is free where u is narrow (MoRe: k·q = 16
// or 32): those GEMMs are bound by reading x and writing y, like LoRA's two GEMMs. Gradients come
// from the dense products and keep only the blocks' entries.
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include "monarch/monarch.h"

namespace shammie::monarch {
namespace {

// The blocks inside the 4-D forms of D1 and D2 (or of their gradients), as views shaped like the
// factors permuted by (1, 2, 0):
// D1 as [i, a, i', j] holds W1[i, a, j] where i' = i: (q, p, k).
at::Tensor first_blocks(at::Tensor& dense_4d) { return dense_4d.diagonal(0, 0, 2); }
// D2 as [m, c, a, c'] holds W2[c, m, a] where c' = c (row m·l + c, column a·l + c'): (s, r, l).
at::Tensor second_blocks(at::Tensor& dense_4d) { return dense_4d.diagonal(0, 1, 3); }

at::Tensor dense_first(const Dims& d, const at::Tensor& w1) {
  at::Tensor dense = at::zeros({d.k, d.q, d.k, d.p}, w1.options());
  first_blocks(dense).copy_(w1.permute({1, 2, 0}));
  return dense.view({d.mid(), d.n()});
}

at::Tensor dense_second(const Dims& d, const at::Tensor& w2) {
  at::Tensor dense = at::zeros({d.s, d.l, d.r, d.l}, w2.options());
  second_blocks(dense).copy_(w2.permute({1, 2, 0}));
  return dense.view({d.out(), d.mid()});
}

}  // namespace

void forward_dense(const ForwardArgs& args) {
  const Dims d = args.dims;
  const at::Tensor u = at::mm(args.x, dense_first(d, args.w1).t());       // (M, k·q)
  at::Tensor y = args.y;
  at::mm_out(y, u, dense_second(d, args.w2).t());
}

void backward_dense(const BackwardArgs& args) {
  const Dims d = args.dims;
  const at::Tensor d1 = dense_first(d, args.w1), d2 = dense_second(d, args.w2);
  const at::Tensor u = at::mm(args.x, d1.t());                            // recomputed, (M, k·q)
  const at::Tensor grad_u = at::mm(args.grad_y, d2);                      // (M, k·q)
  at::Tensor grad_x = args.grad_x;
  at::mm_out(grad_x, grad_u, d1);
  // The blocks of the dense gradients: the same diagonals, back in the factors' layouts.
  at::Tensor grad_d2 = at::mm(args.grad_y.t(), u).view({d.s, d.l, d.r, d.l});
  args.grad_w2.copy_(second_blocks(grad_d2).permute({2, 0, 1}));
  at::Tensor grad_d1 = at::mm(grad_u.t(), args.x).view({d.k, d.q, d.k, d.p});
  args.grad_w1.copy_(first_blocks(grad_d1).permute({2, 0, 1}));
}

}  // namespace shammie::monarch
