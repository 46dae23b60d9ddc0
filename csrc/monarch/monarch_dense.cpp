// The Monarch product as two plain GEMMs (math in monarch.h), for any device: both block-diagonal
// factors are expanded into dense matrices whose rows already carry the butterfly shuffle and the
// output permutation, so no copy of activations remains between or after the GEMMs:
//   y = x · D1ᵀ · D2ᵀ,   D1: (k·q, n) with row c·r + a = z_c[a]'s row of blockdiag(W1),
//                        D2: (l·s, l·r) with row m·l + c = v_c[m]'s row of blockdiag(W2).
// The expansion costs k (resp. l) times the factor's multiply-adds, which is free where u is narrow
// (MoRe: k·q = 16 or 32): those GEMMs are bound by reading x and writing y, like LoRA's two GEMMs.
// Gradients come from the dense products and keep only the blocks' entries.
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include "monarch/monarch.h"

namespace shammie::monarch {
namespace {

// D1 (k·q, n): rows in z's order (c·r + a), nonzero only on the blocks.
at::Tensor dense_first(const Dims& d, const at::Tensor& w1) {
  at::Tensor blockdiag = at::zeros({d.k, d.q, d.k, d.p}, w1.options());    // [i, a', i', j]
  blockdiag.diagonal(0, 0, 2).copy_(w1.permute({1, 2, 0}));                 // [a', j, i] view of i == i'
  // Row u-index f = i·q + a' = a·l + c moves to c·r + a.
  return blockdiag.view({d.r, d.l, d.n()}).transpose(0, 1).reshape({d.mid(), d.n()});
}

// D2 (l·s, l·r): rows in y's order (m·l + c).
at::Tensor dense_second(const Dims& d, const at::Tensor& w2) {
  at::Tensor blockdiag = at::zeros({d.l, d.s, d.l, d.r}, w2.options());    // [c, m, c', a]
  blockdiag.diagonal(0, 0, 2).copy_(w2.permute({1, 2, 0}));
  return blockdiag.view({d.l, d.s, d.mid()}).transpose(0, 1).reshape({d.out(), d.mid()});
}

}  // namespace

void forward_dense(const ForwardArgs& args) {
  const Dims d = args.dims;
  const at::Tensor z = at::mm(args.x, dense_first(d, args.w1).t());      // (M, l·r), z's layout
  at::Tensor y = args.y;
  at::mm_out(y, z, dense_second(d, args.w2).t());
}

void backward_dense(const BackwardArgs& args) {
  const Dims d = args.dims;
  const at::Tensor d1 = dense_first(d, args.w1), d2 = dense_second(d, args.w2);
  const at::Tensor z = at::mm(args.x, d1.t());                           // recomputed, (M, l·r)
  const at::Tensor grad_z = at::mm(args.grad_y, d2);                     // (M, l·r)
  at::Tensor grad_x = args.grad_x;
  at::mm_out(grad_x, grad_z, d1);
  // The blocks of the dense gradients: the inverse of the row moves above, then the diagonal.
  const at::Tensor grad_d2 = at::mm(args.grad_y.t(), z);                 // (l·s, l·r), rows m·l + c
  args.grad_w2.copy_(grad_d2.view({d.s, d.l, d.l, d.r}).diagonal(0, 1, 2).permute({2, 0, 1}));
  const at::Tensor grad_d1 = at::mm(grad_z.t(), args.x);                 // (l·r, n), rows c·r + a
  const at::Tensor by_u = grad_d1.view({d.l, d.r, d.n()}).transpose(0, 1).reshape({d.k, d.q, d.k, d.p});
  args.grad_w1.copy_(by_u.diagonal(0, 0, 2).permute({2, 0, 1}));
}

}  // namespace shammie::monarch
