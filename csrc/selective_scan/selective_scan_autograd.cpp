// Autograd for selective_scan (csrc/common/autograd.h says why in C++). Its second output, the
// state checkpoints, carries the last state's gradient (return_last_state); gradients that nothing
// produced stay undefined (not materialized as zeros) and reach the backward op as None.
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "common/autograd.h"

namespace shammie::ssm {
namespace {

using autograd::AutogradContext;
using autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

struct SelectiveScanFunction : public torch::autograd::Function<SelectiveScanFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                               const at::Tensor& B, const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                               const OptTensor& delta_bias, bool delta_softplus) {
    static const auto op = autograd::find_op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const OptTensor&, const OptTensor&, const OptTensor&, bool)>("shammie::selective_scan");
    at::Tensor out, checkpoints;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, checkpoints) = op.call(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
    }
    ctx->save_for_backward({u, delta, A, B, C, D.value_or(at::Tensor()), z.value_or(at::Tensor()),
                            delta_bias.value_or(at::Tensor()), checkpoints});
    ctx->saved_data["delta_softplus"] = delta_softplus;
    ctx->set_materialize_grads(false);
    return {out, checkpoints};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = autograd::find_op<std::vector<at::Tensor>(
        const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
        bool)>("shammie::selective_scan_backward");
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &u = s[0], &D = s[5], &z = s[6], &delta_bias = s[7];
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(u);
    std::vector<at::Tensor> d;
    {
      at::NoGradGuard no_grad;
      d = op.call(grad_out, autograd::optional(grads[1]), u, s[1], s[2], s[3], s[4], autograd::optional(D),
                  autograd::optional(z), autograd::optional(delta_bias), s[8],
                  ctx->saved_data["delta_softplus"].toBool());
    }
    // du, ddelta, dA, dB, dC; dD, dz, ddelta_bias where given (dD and ddelta_bias come in the
    // accumulation dtype); none for delta_softplus.
    variable_list result{d[0], d[1], d[2], d[3], d[4],
                         D.defined() ? d[5].to(D.scalar_type()) : at::Tensor(),
                         z.defined() ? d[6] : at::Tensor(),
                         delta_bias.defined() ? d[7].to(delta_bias.scalar_type()) : at::Tensor(), at::Tensor()};
    return autograd::once_differentiable("selective_scan", std::move(result),
                                         {grads[0], grads[1], u, s[1], s[2], s[3], s[4], D, z, delta_bias});
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(shammie, Autograd, m) {
  m.impl("selective_scan", [](const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                              const OptTensor& delta_bias, bool delta_softplus) {
    const variable_list out = SelectiveScanFunction::apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
    return std::make_tuple(out[0], out[1]);
  });
  // The decode step writes state in place and has no derivative (common/autograd.h).
  m.impl("selective_state_update",
         torch::CppFunction::makeFromBoxedFunction<&autograd::inplace_no_derivative_autograd>());
}

TORCH_LIBRARY_IMPL(shammie, ADInplaceOrView, m) {
  m.impl("selective_state_update", torch::CppFunction::makeFromBoxedFunction<&autograd::inplace_bump_version>());
}

}  // namespace shammie::ssm
