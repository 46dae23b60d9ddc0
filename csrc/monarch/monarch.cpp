// Monarch product: op schemas, the front end shared by CPU and CUDA (checks, reshapes, output
// allocation), and the CPU registration. The CPU kernels are in monarch_cpu_kernels.cpp.
#include "monarch/monarch.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace shammie {

SHAMMIE_DECLARE_CPU_KERNELS(void monarch_forward(const monarch::ForwardArgs& args);
                            void monarch_backward(const monarch::BackwardArgs& args);)

namespace monarch {
namespace {

constexpr const char* kOp = "blockdiag_butterfly_multiply";

Dims check_inputs(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  check_min_rank(kOp, {x, "x"}, 1, "(..., n)");
  check_rank(kOp, {w1, "w1_bfly"}, 3, "(k, q, p)");
  check_rank(kOp, {w2, "w2_bfly"}, 3, "(l, s, r)");
  check_floating(kOp, {x, "x"});
  check_same_dtype(kOp, {x, "x"}, {w1, "w1_bfly"});
  check_same_dtype(kOp, {x, "x"}, {w2, "w2_bfly"});
  check_same_device(kOp, {x, "x"}, {w1, "w1_bfly"});
  check_same_device(kOp, {x, "x"}, {w2, "w2_bfly"});

  Dims d{};
  d.k = w1.size(0), d.q = w1.size(1), d.p = w1.size(2);
  d.l = w2.size(0), d.s = w2.size(1), d.r = w2.size(2);
  const int64_t n = x.size(-1);
  SHAMMIE_CHECK_VALUE(d.k > 0 && d.q > 0 && d.p > 0, kOp, ": w1_bfly must have non-zero sizes, got ",
                    w1.sizes());
  SHAMMIE_CHECK_VALUE(d.l > 0 && d.s > 0 && d.r > 0, kOp, ": w2_bfly must have non-zero sizes, got ",
                    w2.sizes());
  SHAMMIE_CHECK_VALUE(d.k * d.p == n, kOp, ": x's last dimension must equal k·p = ", d.k, "·", d.p,
                    " = ", d.k * d.p, " for w1_bfly of shape (k, q, p) = ", w1.sizes(), ", got ",
                    n);
  SHAMMIE_CHECK_VALUE(d.l * d.r == d.k * d.q, kOp, ": w2_bfly of shape (l, s, r) = ", w2.sizes(),
                    " needs l·r = k·q = ", d.k * d.q, " (from w1_bfly ", w1.sizes(), "), got l·r = ",
                    d.l * d.r);
  d.tokens = n == 0 ? 0 : x.numel() / n;
  return d;
}

// x as (M, n) with unit inner stride, without copying when x is a row-strided view.
at::Tensor as_rows(const at::Tensor& t, int64_t width) {
  at::Tensor rows = t.reshape({-1, width});
  if (rows.stride(1) != 1 && width > 1) rows = rows.contiguous();
  return rows;
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t width) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = width;
  return shape;
}

}  // namespace

at::Tensor forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                   ForwardKernel kernel) {
  const Dims d = check_inputs(x, w1, w2);
  at::Tensor y = at::empty(output_shape(x, d.out()), x.options());
  if (d.tokens == 0) return y;
  const ForwardArgs args{d, as_rows(x, d.n()), w1.contiguous(), w2.contiguous(), y.view({-1, d.out()})};
  switch (chosen_impl(d, x.is_cuda())) {
    case Impl::kGemm: forward_gemm(args); break;
    case Impl::kDense: forward_dense(args); break;
    case Impl::kKernel: kernel(args); break;
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_y,
                                                        const at::Tensor& x, const at::Tensor& w1,
                                                        const at::Tensor& w2,
                                                        BackwardKernel kernel) {
  constexpr const char* op = "blockdiag_butterfly_multiply_backward";
  const Dims d = check_inputs(x, w1, w2);
  check_same_dtype(op, {x, "x"}, {grad_y, "grad_out"});
  check_same_device(op, {x, "x"}, {grad_y, "grad_out"});
  const auto expected = output_shape(x, d.out());
  SHAMMIE_CHECK_VALUE(grad_y.sizes().vec() == expected, op, ": grad_out must have shape ",
                    at::IntArrayRef(expected), ", got ", grad_y.sizes());
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_w1 = at::empty(w1.sizes(), w1.options());
  at::Tensor grad_w2 = at::empty(w2.sizes(), w2.options());
  if (d.tokens == 0) {
    grad_w1.zero_();
    grad_w2.zero_();
    return {grad_x, grad_w1, grad_w2};
  }
  const BackwardArgs args{d, as_rows(grad_y, d.out()), as_rows(x, d.n()), w1.contiguous(),
                          w2.contiguous(), grad_x.view({-1, d.n()}), grad_w1, grad_w2};
  switch (chosen_impl(d, x.is_cuda())) {
    case Impl::kGemm: backward_gemm(args); break;
    case Impl::kDense: backward_dense(args); break;
    case Impl::kKernel: kernel(args); break;
  }
  return {grad_x, grad_w1, grad_w2};
}

}  // namespace monarch

namespace {

void forward_cpu_kernel(const monarch::ForwardArgs& args) {
  SHAMMIE_CPU_DISPATCH(monarch_forward, args);
}

void backward_cpu_kernel(const monarch::BackwardArgs& args) {
  SHAMMIE_CPU_DISPATCH(monarch_backward, args);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shammie, m) {
  m.def("blockdiag_butterfly_multiply(Tensor x, Tensor w1_bfly, Tensor w2_bfly) -> Tensor");
  m.def(
      "blockdiag_butterfly_multiply_backward(Tensor grad_out, Tensor x, Tensor w1_bfly, "
      "Tensor w2_bfly) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shammie, CPU, m) {
  m.impl("blockdiag_butterfly_multiply", [](const at::Tensor& x, const at::Tensor& w1,
                                            const at::Tensor& w2) {
    return monarch::forward(x, w1, w2, forward_cpu_kernel);
  });
  m.impl("blockdiag_butterfly_multiply_backward",
         [](const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
           return monarch::backward(gy, x, w1, w2, backward_cpu_kernel);
         });
}

}  // namespace shammie
