// Autograd for the Monarch product, in C++ rather than torch.library.register_autograd: MoRe
// calls this op on a few MFLOPs per layer, where the Python wrapper's ~60 µs per fwd+bwd call cost
// more than the kernels. The backward is the registered backward op, so every device and
// implementation (kernel, gemm, dense) shares it.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "common/errors.h"

namespace shammie::monarch {
namespace {

at::Tensor forward_op(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("shammie::blockdiag_butterfly_multiply", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, w1, w2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& grad_y,
                                                           const at::Tensor& x,
                                                           const at::Tensor& w1,
                                                           const at::Tensor& w2) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("shammie::blockdiag_butterfly_multiply_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_y, x, w1, w2);
}

// Identity on the three gradients, linked to what they were computed from; its backward raises
// (what @once_differentiable does in Python).
struct OnceDifferentiable : public torch::autograd::Function<OnceDifferentiable> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext*,
                                                const at::Tensor& grad_x, const at::Tensor& grad_w1,
                                                const at::Tensor& grad_w2, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&) {
    return {grad_x, grad_w1, grad_w2};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list) {
    SHAMMIE_CHECK(false,
                  "blockdiag_butterfly_multiply: differentiating its gradients again (double "
                  "backward, or create_graph=True followed by a backward through them) is not "
                  "supported");
    return {};
  }
};

struct MonarchFunction : public torch::autograd::Function<MonarchFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w1, const at::Tensor& w2) {
    ctx->save_for_backward({x, w1, w2});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op(x, w1, w2);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool create_graph = at::GradMode::is_enabled();
    at::Tensor grad_x, grad_w1, grad_w2;
    {
      at::NoGradGuard no_grad;
      std::tie(grad_x, grad_w1, grad_w2) = backward_op(grads[0], saved[0], saved[1], saved[2]);
    }
    // The backward op has no derivative of its own: under create_graph=True, pass the gradients
    // through a node whose backward raises, instead of letting a double backward see zeros.
    if (create_graph) return OnceDifferentiable::apply(grad_x, grad_w1, grad_w2, grads[0], saved[0], saved[1], saved[2]);
    return {grad_x, grad_w1, grad_w2};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(shammie, Autograd, m) {
  m.impl("blockdiag_butterfly_multiply",
         [](const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
           return MonarchFunction::apply(x, w1, w2);
         });
}

}  // namespace shammie::monarch
