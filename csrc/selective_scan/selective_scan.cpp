// selective_scan: schemas, the front end shared by CPU and CUDA, and the CPU registration.
#include "selective_scan/selective_scan.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace shammie {

SHAMMIE_DECLARE_CPU_KERNELS(void selective_scan_forward(const ssm::ScanForwardArgs& args);
                            void selective_scan_backward(const ssm::ScanBackwardArgs& args);)

namespace ssm {
namespace {

constexpr const char* kOp = "selective_scan";

// B or C: constant (dim, N), variable (batch, N, L) or grouped (batch, G, N, L); returned as the
// kernels want it (see ScanArgs), with the number of groups (0 for constant).
std::pair<at::Tensor, int64_t> time_major(Arg a, int64_t batch, int64_t dim, int64_t dstate, int64_t seqlen,
                                          at::ScalarType acc) {
  const at::Tensor& t = a.tensor;
  SHAMMIE_CHECK_TYPE(!t.is_complex(), kOp, ": complex ", a.name, " is not supported (only real A, B, C)");
  check_floating(kOp, a);
  if (t.dim() == 2) {
    check_shape(kOp, a, {dim, dstate}, "(dim, dstate) for a constant one");
    return {t.to(acc).contiguous(), 0};
  }
  SHAMMIE_CHECK_VALUE(t.dim() == 3 || t.dim() == 4, kOp, ": ", a.name,
                    " must be (dim, dstate), (batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen), got ",
                    t.sizes());
  const int64_t groups = t.dim() == 4 ? t.size(1) : 1;
  SHAMMIE_CHECK_VALUE(groups >= 1 && dim % groups == 0, kOp, ": dim (", dim, ") must be a multiple of ", a.name,
                    "'s ngroups (", groups, ")");
  if (t.dim() == 4) check_shape(kOp, a, {batch, groups, dstate, seqlen}, "(batch, ngroups, dstate, seqlen)");
  else check_shape(kOp, a, {batch, dstate, seqlen}, "(batch, dstate, seqlen)");
  return {t.reshape({batch, groups, dstate, seqlen}).transpose(2, 3).to(acc).contiguous(), groups};
}

at::Tensor channel_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& u, int64_t dim,
                         at::ScalarType acc) {
  if (!t) return at::zeros({dim}, u.options().dtype(acc));
  check_floating(kOp, {*t, name});
  check_same_device(kOp, {u, "u"}, {*t, name});
  check_shape(kOp, {*t, name}, {dim}, "(dim,)");
  return t->to(acc).contiguous();
}

ScanArgs make_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                   const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  check_rank(kOp, {u, "u"}, 3, "(batch, dim, seqlen)");
  check_floating(kOp, {u, "u"});
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2);
  for (Arg a : {Arg{delta, "delta"}, Arg{A, "A"}, Arg{B, "B"}, Arg{C, "C"}}) check_same_device(kOp, {u, "u"}, a);
  check_shape(kOp, {delta, "delta"}, u.sizes(), "(batch, dim, seqlen) like u");
  check_same_dtype(kOp, {u, "u"}, {delta, "delta"});
  if (z) {
    check_same_device(kOp, {u, "u"}, {*z, "z"});
    check_shape(kOp, {*z, "z"}, u.sizes(), "(batch, dim, seqlen) like u");
    check_same_dtype(kOp, {u, "u"}, {*z, "z"});
  }
  SHAMMIE_CHECK_TYPE(!A.is_complex(), kOp, ": complex A is not supported (only real A, B, C)");
  check_floating(kOp, {A, "A"});
  check_rank(kOp, {A, "A"}, 2, "(dim, dstate)");
  const int64_t dstate = A.size(1);
  SHAMMIE_CHECK_VALUE(A.size(0) == dim && dstate >= 1 && dstate <= kMaxDstate, kOp,
                    ": A must have shape (dim, dstate) with dim = ", dim, " and 1 <= dstate <= ", kMaxDstate, ", got ",
                    A.sizes());
  const auto acc = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto [B_t, B_groups] = time_major({B, "B"}, batch, dim, dstate, seqlen, acc);
  auto [C_t, C_groups] = time_major({C, "C"}, batch, dim, dstate, seqlen, acc);
  SHAMMIE_CHECK_VALUE(B_groups == 0 || C_groups == 0 || B_groups == C_groups, kOp,
                    ": B and C must have the same ngroups, got ", B_groups, " and ", C_groups);
  const int64_t groups = std::max<int64_t>({B_groups, C_groups, 1});
  return ScanArgs{batch, dim, seqlen, dstate, groups, delta_softplus, B_groups > 0, C_groups > 0,
                  u.contiguous(), delta.contiguous(),
                  z ? std::optional<at::Tensor>(z->contiguous()) : std::nullopt, A.to(acc).contiguous(),
                  B_t, C_t, channel_param(D, "D", u, dim, acc), channel_param(delta_bias, "delta_bias", u, dim, acc),
                  at::Tensor()};
}

// A gradient in the accumulation dtype and the kernels' layout, back to its input's shape and dtype.
at::Tensor like_input(const at::Tensor& grad, const at::Tensor& input) {
  if (input.dim() == 2) return grad.to(input.scalar_type());
  return grad.transpose(2, 3).reshape(input.sizes()).to(input.scalar_type()).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> selective_scan_forward(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus, ScanForwardKernel kernel) {
  ScanArgs in = make_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  const int64_t n_cp = num_checkpoints(in.seqlen, in.dstate);
  in.checkpoints = at::zeros({in.batch, in.dim, n_cp, in.dstate}, in.A.options());
  ScanForwardArgs args{in, at::empty({in.batch, in.dim, in.seqlen}, u.options())};
  if (in.batch * in.dim * in.seqlen > 0) kernel(args);
  return {args.out, in.checkpoints};
}

std::vector<at::Tensor> selective_scan_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_checkpoints, const at::Tensor& u,
    const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, const at::Tensor& checkpoints, bool delta_softplus,
    ScanBackwardKernel kernel) {
  ScanArgs in = make_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  const std::vector<int64_t> cp_shape{in.batch, in.dim, num_checkpoints(in.seqlen, in.dstate), in.dstate};
  check_same_device(kOp, {u, "u"}, {checkpoints, "checkpoints"});
  check_shape(kOp, {checkpoints, "checkpoints"}, cp_shape, "(batch, dim, num_checkpoints, dstate), as the forward returned");
  SHAMMIE_CHECK_TYPE(checkpoints.scalar_type() == in.A.scalar_type(), kOp, ": checkpoints must be ",
                   in.A.scalar_type(), ", as the forward returned, got ", checkpoints.scalar_type());
  in.checkpoints = checkpoints.contiguous();
  check_same_device(kOp, {u, "u"}, {grad_out, "grad_out"});
  check_shape(kOp, {grad_out, "grad_out"}, u.sizes(), "(batch, dim, seqlen) like u");
  check_same_dtype(kOp, {u, "u"}, {grad_out, "grad_out"});
  std::optional<at::Tensor> grad_cp;
  if (grad_checkpoints) {
    check_same_device(kOp, {u, "u"}, {*grad_checkpoints, "grad_checkpoints"});
    check_shape(kOp, {*grad_checkpoints, "grad_checkpoints"}, cp_shape, "like checkpoints");
    grad_cp = grad_checkpoints->to(in.A.scalar_type()).contiguous();
  }
  const auto act = u.options().memory_format(at::MemoryFormat::Contiguous);
  ScanBackwardArgs args{in, grad_out.contiguous(), grad_cp, at::empty(u.sizes(), act), at::empty(u.sizes(), act),
                        z ? std::optional<at::Tensor>(at::empty(u.sizes(), act)) : std::nullopt,
                        at::zeros_like(in.A), at::zeros_like(in.D), at::zeros_like(in.D),
                        at::zeros_like(in.B), at::zeros_like(in.C)};
  if (in.batch * in.dim * in.seqlen > 0) {
    kernel(args);
  } else {
    args.du.zero_();
    args.ddelta.zero_();
    if (args.dz) args.dz->zero_();
  }
  return {args.du, args.ddelta, args.dA.to(A.scalar_type()), like_input(args.dB, B), like_input(args.dC, C),
          args.dD, args.dz ? *args.dz : at::empty({0}, u.options()), args.ddelta_bias};
}

}  // namespace ssm

namespace {
void forward_cpu(const ssm::ScanForwardArgs& a) { SHAMMIE_CPU_DISPATCH(selective_scan_forward, a); }
void backward_cpu(const ssm::ScanBackwardArgs& a) { SHAMMIE_CPU_DISPATCH(selective_scan_backward, a); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(shammie, m) {
  m.def(
      "selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus) -> (Tensor out, Tensor checkpoints)");
  m.def(
      "selective_scan_backward(Tensor grad_out, Tensor? grad_checkpoints, Tensor u, Tensor delta, Tensor A, "
      "Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor checkpoints, bool delta_softplus) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(shammie, CPU, m) {
  m.impl("selective_scan",
         [](const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
            const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
           return ssm::selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, forward_cpu);
         });
  m.impl("selective_scan_backward",
         [](const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_cp, const at::Tensor& u,
            const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
            const std::optional<at::Tensor>& delta_bias, const at::Tensor& checkpoints, bool delta_softplus) {
           return ssm::selective_scan_backward(grad_out, grad_cp, u, delta, A, B, C, D, z, delta_bias, checkpoints,
                                               delta_softplus, backward_cpu);
         });
}

}  // namespace shammie
