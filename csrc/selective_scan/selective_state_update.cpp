// selective_state_update: schema, the front end shared by CPU and CUDA, and the CPU registration.
#include "selective_scan/selective_state_update.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace shammie {

SHAMMIE_DECLARE_CPU_KERNELS(void selective_state_update(const ssm::StateUpdateArgs& args);)

namespace ssm {
namespace {

constexpr const char* kOp = "selective_state_update";

// A per-channel parameter as (H, P) in the accumulation dtype; zeros when absent.
at::Tensor channel_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x, int64_t heads,
                         int64_t dim, bool four_d, at::ScalarType acc) {
  if (!t) return at::zeros({heads, dim}, x.options().dtype(acc));
  check_floating(kOp, {*t, name});
  check_same_device(kOp, {x, "x"}, {*t, name});
  if (four_d) check_shape(kOp, {*t, name}, {heads, dim}, "(nheads, dim)");
  else check_shape(kOp, {*t, name}, {dim}, "(dim,)");
  return t->to(acc).reshape({heads, dim}).contiguous();
}

}  // namespace

at::Tensor selective_state_update(const at::Tensor& state_in, const at::Tensor& x_in, const at::Tensor& dt_in,
                                  const at::Tensor& A_in, const at::Tensor& B_in, const at::Tensor& C_in,
                                  const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z_in,
                                  const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                  const std::optional<at::Tensor>& state_batch_indices, StateUpdateKernel kernel,
                                  bool values_on_host) {
  SHAMMIE_CHECK_VALUE(state_in.dim() == 3 || state_in.dim() == 4, kOp,
                    ": state must be (batch, dim, dstate) or (batch, nheads, dim, dstate), got ", state_in.sizes());
  const bool four_d = state_in.dim() == 4;
  const at::Tensor state = four_d ? state_in : state_in.unsqueeze(1);
  // With state_batch_indices the state is a cache of any number of rows, and x gives the batch.
  const int64_t batch = state_batch_indices && x_in.dim() > 0 ? x_in.size(0) : state.size(0);
  const int64_t heads = state.size(1), dim = state.size(2), dstate = state.size(3);
  SHAMMIE_CHECK_VALUE(dstate >= 1, kOp, ": state's dstate must be at least 1, got ", state_in.sizes());
  check_floating(kOp, {state_in, "state"});
  check_floating(kOp, {x_in, "x"});
  const auto dtype = x_in.scalar_type();
  SHAMMIE_CHECK_TYPE(state_in.scalar_type() == dtype || state_in.scalar_type() == at::kFloat, kOp,
                   ": state must have x's dtype (", dtype, ") or float32, got ", state_in.scalar_type());
  const char* act_layout = four_d ? "(batch, nheads, dim)" : "(batch, dim)";
  const std::vector<int64_t> act_shape = four_d ? std::vector<int64_t>{batch, heads, dim} : std::vector<int64_t>{batch, dim};
  for (Arg a : {Arg{x_in, "x"}, Arg{dt_in, "dt"}}) {
    check_shape(kOp, a, act_shape, act_layout);
    check_same_dtype(kOp, {x_in, "x"}, a);
    check_same_device(kOp, {x_in, "x"}, a);
  }
  check_same_device(kOp, {x_in, "x"}, {state_in, "state"});
  if (z_in) {
    check_shape(kOp, {*z_in, "z"}, act_shape, act_layout);
    check_same_dtype(kOp, {x_in, "x"}, {*z_in, "z"});
    check_same_device(kOp, {x_in, "x"}, {*z_in, "z"});
  }
  SHAMMIE_CHECK_TYPE(!A_in.is_complex(), kOp, ": complex A is not supported");
  check_floating(kOp, {A_in, "A"});
  check_same_device(kOp, {x_in, "x"}, {A_in, "A"});
  if (four_d) check_shape(kOp, {A_in, "A"}, {heads, dim, dstate}, "(nheads, dim, dstate)");
  else check_shape(kOp, {A_in, "A"}, {dim, dstate}, "(dim, dstate)");
  const int64_t rank_bc = four_d ? 3 : 2;
  for (Arg a : {Arg{B_in, "B"}, Arg{C_in, "C"}}) {
    check_rank(kOp, a, rank_bc, four_d ? "(batch, ngroups, dstate)" : "(batch, dstate)");
    check_same_dtype(kOp, {x_in, "x"}, a);
    check_same_device(kOp, {x_in, "x"}, a);
  }
  const int64_t groups = four_d ? B_in.size(1) : 1;
  SHAMMIE_CHECK_VALUE(groups >= 1 && heads % groups == 0, kOp, ": nheads (", heads,
                    ") must be a multiple of B's ngroups (", groups, ")");
  for (Arg a : {Arg{B_in, "B"}, Arg{C_in, "C"}}) {
    if (four_d) check_shape(kOp, a, {batch, groups, dstate}, "(batch, ngroups, dstate)");
    else check_shape(kOp, a, {batch, dstate}, "(batch, dstate)");
  }
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  StateUpdateArgs args{batch, heads, dim, dstate, groups, dt_softplus, state,
                       x_in.reshape({batch, heads, dim}).contiguous(), dt_in.reshape({batch, heads, dim}).contiguous(),
                       z_in ? std::optional<at::Tensor>(z_in->reshape({batch, heads, dim}).contiguous()) : std::nullopt,
                       A_in.to(acc).reshape({heads, dim, dstate}).contiguous(),
                       B_in.reshape({batch, groups, dstate}).contiguous(), C_in.reshape({batch, groups, dstate}).contiguous(),
                       channel_param(D, "D", x_in, heads, dim, four_d, acc),
                       channel_param(dt_bias, "dt_bias", x_in, heads, dim, four_d, acc),
                       at::empty({batch, heads, dim}, x_in.options())};
  if (state_batch_indices) {
    args.state_rows = checked_state_indices(kOp, *state_batch_indices, "state_batch_indices", {x_in, "x"}, batch,
                                            state.size(0), values_on_host);
  }
  if (args.out.numel() > 0) kernel(args);
  return args.out.view(x_in.sizes());
}

}  // namespace ssm

namespace {
void state_update_cpu(const ssm::StateUpdateArgs& a) { SHAMMIE_CPU_DISPATCH(selective_state_update, a); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(shammie, m) {
  m.def(
      "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(shammie, CPU, m) {
  m.impl("selective_state_update",
         [](const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
            const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
            const std::optional<at::Tensor>& dt_bias, bool dt_softplus, const std::optional<at::Tensor>& rows) {
           return ssm::selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, rows,
                                              state_update_cpu);
         });
}

}  // namespace shammie
