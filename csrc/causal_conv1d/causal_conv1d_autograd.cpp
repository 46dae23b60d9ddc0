// Autograd for causal_conv1d (csrc/common/autograd.h says why in C++): the backward is the
// registered backward op.
#include <torch/library.h>

#include "common/autograd.h"

namespace shammie::conv1d {
namespace {

using autograd::AutogradContext;
using autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

struct CausalConv1dFunction : public torch::autograd::Function<CausalConv1dFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptTensor& bias, bool silu, const OptTensor& seq_idx) {
    static const auto op =
        autograd::find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, bool, const OptTensor&)>(
            "shammie::causal_conv1d");
    ctx->save_for_backward({x, weight, bias.value_or(at::Tensor()), seq_idx.value_or(at::Tensor())});
    ctx->saved_data["silu"] = silu;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x, weight, bias, silu, seq_idx);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = autograd::find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, bool, const OptTensor&)>(
        "shammie::causal_conv1d_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &seq_idx = saved[3];
    at::Tensor dx, dweight, dbias;
    {
      at::NoGradGuard no_grad;
      std::tie(dx, dweight, dbias) = op.call(grads[0], x, weight, autograd::optional(bias),
                                             ctx->saved_data["silu"].toBool(), autograd::optional(seq_idx));
    }
    // One gradient per input: x, weight, bias (if given), silu and seq_idx (none).
    return autograd::once_differentiable(
        "causal_conv1d", {dx, dweight, bias.defined() ? dbias : at::Tensor(), at::Tensor(), at::Tensor()},
        {grads[0], x, weight, bias});
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(shammie, Autograd, m) {
  m.impl("causal_conv1d", [](const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, bool silu,
                             const OptTensor& seq_idx) {
    return CausalConv1dFunction::apply(x, weight, bias, silu, seq_idx);
  });
  // The decode step writes conv_state in place and has no derivative (common/autograd.h).
  m.impl("causal_conv1d_update", torch::CppFunction::makeFromBoxedFunction<&autograd::inplace_no_derivative_autograd>());
}

TORCH_LIBRARY_IMPL(shammie, ADInplaceOrView, m) {
  m.impl("causal_conv1d_update", torch::CppFunction::makeFromBoxedFunction<&autograd::inplace_bump_version>());
}

}  // namespace shammie::conv1d
