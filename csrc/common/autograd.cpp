#include "common/autograd.h"

#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

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

namespace {

bool is_written(const c10::Argument& arg) { return arg.alias_info() != nullptr && arg.alias_info()->isWrite(); }

}  // namespace

void inplace_no_derivative_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                    torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  const bool grad_mode = at::GradMode::is_enabled();
  variable_list differentiable;
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& value = (*stack)[first + i];
    if (!grad_mode || !value.isTensor() || !value.toTensor().requires_grad()) continue;
    SHAMMIE_CHECK(!is_written(args[i]), op.schema().name(), ": ", args[i].name(),
                  " requires grad, but this decode step updates it in place and has no derivative; "
                  "pass a state that does not require grad, or call it under torch.no_grad()");
    differentiable.push_back(value.toTensor());
  }
  {
    at::AutoDispatchBelowAutograd below_autograd;   // on to ADInplaceOrView, which bumps the versions
    op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
  }
  if (differentiable.empty()) return;
  // Outputs depend on inputs that require grad: a backward through them must raise, not pass silently.
  const auto node = c10::make_intrusive<torch::autograd::NotImplemented>(
      op.schema().name(), torch::autograd::collect_next_edges(differentiable));
  const size_t returns = op.schema().returns().size();
  for (size_t i = stack->size() - returns; i < stack->size(); ++i)
    if ((*stack)[i].isTensor()) torch::autograd::set_history((*stack)[i].toTensor(), node);
}

void inplace_bump_version(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  std::vector<at::Tensor> written;   // the stack's arguments are gone once the op has run
  for (size_t i = 0; i < args.size(); ++i)
    if (is_written(args[i]) && (*stack)[first + i].isTensor()) written.push_back((*stack)[first + i].toTensor());
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::impl::bump_version(t);
}

}  // namespace shammie::autograd
