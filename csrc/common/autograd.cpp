#include "common/autograd.h"

#include <vector>

#include "common/errors.h"

namespace shammie::autograd {
namespace {

// Identity on the defined gradients; its inputs also take the sources, so that any derivative of
// the gradients reaches this node's backward, which raises (what @once_differentiable does in Python).
struct RaiseOnBackward : public torch::autograd::Function<RaiseOnBackward> {
  static variable_list forward(AutogradContext* ctx, const std::string& op, at::TensorList grads,
                               at::TensorList /*sources*/) {
    ctx->saved_data["op"] = op;
    return variable_list(grads.begin(), grads.end());
  }

  static variable_list backward(AutogradContext* ctx, variable_list /*grads*/) {
    SHAMMIE_CHECK(false, ctx->saved_data["op"].toStringRef(),
                  ": differentiating its gradients again (double backward, or create_graph=True "
                  "followed by a backward through them) is not supported");
    return {};
  }
};

}  // namespace

variable_list once_differentiable(const std::string& op, variable_list grads, const variable_list& sources) {
  if (!at::GradMode::is_enabled()) return grads;
  variable_list defined, linked_sources;
  for (const at::Tensor& g : grads)
    if (g.defined()) defined.push_back(g);
  for (const at::Tensor& s : sources)
    if (s.defined() && s.requires_grad()) linked_sources.push_back(s);
  if (defined.empty() || linked_sources.empty()) return grads;
  const variable_list linked = RaiseOnBackward::apply(op, at::TensorList(defined), at::TensorList(linked_sources));
  size_t next = 0;
  for (at::Tensor& g : grads)
    if (g.defined()) g = linked[next++];
  return grads;
}

}  // namespace shammie::autograd
