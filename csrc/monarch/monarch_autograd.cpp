// Autograd for the Monarch product (csrc/common/autograd.h says why in C++). MoRe calls this op on
// a few MFLOPs per layer, where host time per call is most of the cost. The backward is the
// registered backward op, so every device and implementation (kernel, gemm, dense) shares it.
#include <torch/library.h>

#include "common/autograd.h"

namespace shammie::monarch {
namespace {

using autograd::AutogradContext;
using autograd::variable_list;

struct MonarchFunction : public torch::autograd::Function<MonarchFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                            const at::Tensor& w2) {
    static const auto op = autograd::find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
        "shammie::blockdiag_butterfly_multiply");
    ctx->save_for_backward({x, w1, w2});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x, w1, w2);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = autograd::find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
        "shammie::blockdiag_butterfly_multiply_backward");
    const variable_list saved = ctx->get_saved_variables();
    variable_list out(3);
    {
      at::NoGradGuard no_grad;
      std::tie(out[0], out[1], out[2]) = op.call(grads[0], saved[0], saved[1], saved[2]);
    }
    return autograd::once_differentiable("blockdiag_butterfly_multiply", std::move(out),
                                         {grads[0], saved[0], saved[1], saved[2]});
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(shammie, Autograd, m) {
  m.impl("blockdiag_butterfly_multiply", [](const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
    return MonarchFunction::apply(x, w1, w2);
  });
}

}  // namespace shammie::monarch
