// What the ops' C++ autograd (csrc/<family>/<family>_autograd.cpp) shares. Autograd lives in C++
// rather than in torch.library.register_autograd because the Python wrapper cost ~50 µs per forward
// + backward call (more than MoRe's adapter kernels), and because under forward-mode AD
// (torch.func.jvp) it silently returned zero tangents, where a C++ Function raises.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

namespace shammie::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The registered op `shammie::<name>` with C++ signature Sig, looked up once per call site.
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
}

// The backward ops have no derivative of their own. Call this on a backward's results: without
// create_graph it returns them as they are; with it, they pass through a node linked to `sources`
// (the incoming gradients and the saved inputs) whose backward raises "`op`: differentiating its
// gradients again (double backward ...) is not supported", instead of a double backward silently
// treating them as constants. Undefined gradients stay undefined.
variable_list once_differentiable(const std::string& op, variable_list grads, const variable_list& sources);

// Undefined tensors as nullopt, for Tensor? arguments.
inline std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The decode steps (causal_conv1d_update, selective_state_update) write a state argument declared
// `Tensor(a!)` and have no derivative. A custom op gets no ADInplaceOrView kernel of its own, so
// without these the state's version counter never moves and autograd cannot see that a tensor it
// saved was overwritten. Register both, as boxed kernels, for each such op:
// - inplace_no_derivative_autograd (Autograd key): refuses a written argument that requires grad
//   (naming it) while grad mode is on, as torch refuses an in-place op on a leaf; outputs computed
//   from inputs that require grad get a node whose backward raises (the op has no derivative).
// - inplace_bump_version (ADInplaceOrView key): bumps the version of every written argument, also
//   under torch.no_grad() and inference mode (for normal tensors), as torch's in-place ops do.
void inplace_no_derivative_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack);
void inplace_bump_version(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack);

}  // namespace shammie::autograd
