// Autograd for ssd_scan, the Mamba-2 scan (csrc/common/autograd.h says why in C++). Of its four
// outputs, out, final_state and varlen_states carry gradients; the checkpoints are the backward's
// starting states and get none. Gradients that nothing produced stay undefined (not zeros).
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "common/autograd.h"

namespace shammie::ssd {
namespace {

using autograd::AutogradContext;
using autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using Tensor = at::Tensor;

struct SsdScanFunction : public torch::autograd::Function<SsdScanFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& dt, const Tensor& A,
                               const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z,
                               const OptTensor& dt_bias, const OptTensor& initial_states, bool dt_softplus,
                               const OptTensor& seq_idx, const OptTensor& cu_seqlens) {
    static const auto op = autograd::find_op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
        const OptTensor&, const OptTensor&, const OptTensor&, bool, const OptTensor&, const OptTensor&)>(
        "shammie::ssd_scan");
    Tensor out, checkpoints, final_state, varlen_states;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, checkpoints, final_state, varlen_states) =
          op.call(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, seq_idx, cu_seqlens);
    }
    const Tensor none;
    ctx->save_for_backward({x, dt, A, B, C, D.value_or(none), z.value_or(none), dt_bias.value_or(none),
                            initial_states.value_or(none), checkpoints, seq_idx.value_or(none),
                            cu_seqlens.value_or(none)});
    ctx->saved_data["dt_softplus"] = dt_softplus;
    ctx->mark_non_differentiable({checkpoints});
    ctx->set_materialize_grads(false);
    return {out, checkpoints, final_state, varlen_states};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = autograd::find_op<std::vector<Tensor>(
        const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, bool,
        const OptTensor&, const OptTensor&, const OptTensor&)>("shammie::ssd_scan_backward");
    const variable_list s = ctx->get_saved_variables();
    const Tensor &x = s[0], &D = s[5], &z = s[6], &dt_bias = s[7], &initial_states = s[8], &cu_seqlens = s[11];
    const Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(x);
    // Without cu_seqlens varlen_states is an empty (0, ...) tensor: no gradient to pass on.
    const Tensor grad_varlen = cu_seqlens.defined() ? grads[3] : Tensor();
    std::vector<Tensor> d;
    {
      at::NoGradGuard no_grad;
      using autograd::optional;
      d = op.call(grad_out, optional(grads[2]), x, s[1], s[2], s[3], s[4], optional(D), optional(z),
                  optional(dt_bias), optional(initial_states), s[9], ctx->saved_data["dt_softplus"].toBool(),
                  optional(s[10]), optional(cu_seqlens), optional(grad_varlen));
    }
    // dx, ddt, dA, dB, dC; dD, dz, ddt_bias, dinitial_states where given (ddt_bias comes in the
    // accumulation dtype); none for dt_softplus, seq_idx and cu_seqlens.
    const Tensor none;
    variable_list result{d[0], d[1], d[2], d[3], d[4],
                         D.defined() ? d[5] : none,
                         z.defined() ? d[6] : none,
                         dt_bias.defined() ? d[7].to(dt_bias.scalar_type()) : none,
                         initial_states.defined() ? d[8] : none,
                         none, none, none};
    return autograd::once_differentiable(
        "ssd_scan", std::move(result),
        {grads[0], grads[2], grads[3], x, s[1], s[2], s[3], s[4], D, z, dt_bias, initial_states});
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(shammie, Autograd, m) {
  m.impl("ssd_scan", [](const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B, const Tensor& C,
                        const OptTensor& D, const OptTensor& z, const OptTensor& dt_bias,
                        const OptTensor& initial_states, bool dt_softplus, const OptTensor& seq_idx,
                        const OptTensor& cu_seqlens) {
    const variable_list out =
        SsdScanFunction::apply(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, seq_idx, cu_seqlens);
    return std::make_tuple(out[0], out[1], out[2], out[3]);
  });
}

}  // namespace shammie::ssd
