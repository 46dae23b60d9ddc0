// ssd_scan: schemas, the front end shared by CPU and CUDA, and the CPU registration.
#include "ssd/ssd_scan.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "ssd/ssd_scan_registration.h"

namespace shammie {

SHAMMIE_DECLARE_CPU_KERNELS(void ssd_scan_forward(const ssd::SsdForwardArgs& args);
                            void ssd_scan_backward(const ssd::SsdBackwardArgs& args);)

namespace ssd {
namespace {

constexpr const char* kOp = "ssd_scan";

// A per-head or per-row parameter, in the accumulation dtype, with zeros when absent.
at::Tensor parameter(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x, int64_t size,
                     at::ScalarType acc) {
  if (!t) return at::zeros({size}, x.options().dtype(acc));
  check_floating(kOp, {*t, name});
  check_same_device(kOp, {x, "x"}, {*t, name});
  return t->to(acc).reshape({size}).contiguous();
}

// cu_seqlens (num_seqs + 1,), mamba_ssm's convention: batch 1, sequence s holds steps cu[s] .. cu[s+1]−1.
// Checked on the host (from a GPU that is one copy of num_seqs + 1 ints, and L more for a seq_idx given
// with it). Sets the kernels' slot map and, when seq_idx is absent, the ids the boundaries imply; a
// given seq_idx must change exactly where a non-empty sequence starts.
void add_packing(SsdArgs& a, const at::Tensor& cu_seqlens, const at::Tensor& x) {
  check_same_device(kOp, {x, "x"}, {cu_seqlens, "cu_seqlens"});
  SHAMMIE_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong, kOp,
                   ": cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  SHAMMIE_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2, kOp,
                    ": cu_seqlens must have shape (num_seqs + 1,) with num_seqs >= 1, got ", cu_seqlens.sizes());
  SHAMMIE_CHECK_VALUE(a.batch == 1, kOp, ": cu_seqlens needs batch 1 (sequences packed along seqlen), got batch ",
                    a.batch);
  const at::Tensor cu = cu_seqlens.to(at::kCPU).to(at::kLong).contiguous();
  const int64_t* c = cu.const_data_ptr<int64_t>();
  const int64_t num_seqs = cu.size(0) - 1, L = a.seqlen;
  SHAMMIE_CHECK_VALUE(c[0] == 0 && c[num_seqs] == L, kOp, ": cu_seqlens must run from 0 to seqlen (", L, "), got ",
                    c[0], " .. ", c[num_seqs]);
  for (int64_t s = 0; s < num_seqs; ++s) {
    SHAMMIE_CHECK_VALUE(c[s] <= c[s + 1], kOp, ": cu_seqlens must be non-decreasing, got cu_seqlens[", s, "] = ", c[s],
                      " > cu_seqlens[", s + 1, "] = ", c[s + 1]);
  }
  // An empty first sequence would have to end in the initial state while step 0 starts from it.
  SHAMMIE_CHECK_VALUE(!a.initial_states || c[1] > 0, kOp,
                    ": with initial_states the first sequence must not be empty (cu_seqlens[1] > 0)");
  const auto host_long = at::TensorOptions().dtype(at::kLong);
  at::Tensor slot = at::full({1, L}, -1, host_long), ids = at::empty({1, L}, host_long);
  int64_t* slot_of = slot.data_ptr<int64_t>();
  int64_t* id = ids.data_ptr<int64_t>();
  a.seq_ends.assign(num_seqs, -1);
  for (int64_t s = 0; s < num_seqs; ++s) {
    std::fill(id + c[s], id + c[s + 1], s);
    if (c[s + 1] == c[s]) continue;   // empty: its state stays zero
    a.seq_ends[s] = c[s + 1] - 1;
    slot_of[c[s + 1] - 1] = s;
  }
  if (a.seq_idx) {
    const at::Tensor given = a.seq_idx->to(at::kCPU);
    const int64_t* g = given.const_data_ptr<int64_t>();
    for (int64_t t = 1; t < L; ++t) {
      const bool starts = g[t] != g[t - 1];
      SHAMMIE_CHECK_VALUE(starts == (id[t] != id[t - 1]), kOp, ": seq_idx and cu_seqlens disagree at step ", t,
                        ": seq_idx ", starts ? "starts" : "does not start", " a sequence there");
    }
  } else {
    a.seq_idx = ids.to(x.device());
  }
  a.state_slot = slot.to(x.device());
  a.num_seqs = num_seqs;
}

SsdArgs make_args(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                  const std::optional<at::Tensor>& dt_bias, const std::optional<at::Tensor>& initial_states,
                  bool softplus, const std::optional<at::Tensor>& seq_idx,
                  const std::optional<at::Tensor>& cu_seqlens) {
  check_rank(kOp, {x, "x"}, 4, "(batch, seqlen, nheads, headdim)");
  check_floating(kOp, {x, "x"});
  const int64_t batch = x.size(0), seqlen = x.size(1), heads = x.size(2), headdim = x.size(3);
  check_rank(kOp, {B, "B"}, 4, "(batch, seqlen, ngroups, dstate)");
  const int64_t groups = B.size(2), dstate = B.size(3);
  SHAMMIE_CHECK_VALUE(dstate >= 1 && dstate <= kMaxDstate, kOp, ": B and C must have 1 <= dstate <= ", kMaxDstate,
                    ", got ", dstate);
  SHAMMIE_CHECK_VALUE(groups >= 1 && heads % groups == 0, kOp, ": nheads (", heads, ") must be a multiple of ngroups (",
                    groups, ")");
  for (Arg a : {Arg{dt, "dt"}, Arg{A, "A"}, Arg{B, "B"}, Arg{C, "C"}}) check_same_device(kOp, {x, "x"}, a);
  check_shape(kOp, {dt, "dt"}, {batch, seqlen, heads}, "(batch, seqlen, nheads)");
  check_same_dtype(kOp, {x, "x"}, {dt, "dt"});
  check_shape(kOp, {C, "C"}, B.sizes(), "(batch, seqlen, ngroups, dstate) like B");
  check_shape(kOp, {B, "B"}, {batch, seqlen, groups, dstate}, "(batch, seqlen, ngroups, dstate)");
  for (Arg a : {Arg{B, "B"}, Arg{C, "C"}, Arg{A, "A"}}) {
    SHAMMIE_CHECK_TYPE(!a.tensor.is_complex(), kOp, ": complex ", a.name, " is not supported");
    check_floating(kOp, a);
  }
  check_shape(kOp, {A, "A"}, {heads}, "(nheads,)");
  if (z) {
    check_same_device(kOp, {x, "x"}, {*z, "z"});
    check_shape(kOp, {*z, "z"}, x.sizes(), "(batch, seqlen, nheads, headdim) like x");
    check_same_dtype(kOp, {x, "x"}, {*z, "z"});
  }
  if (D) {
    SHAMMIE_CHECK_VALUE(D->sizes() == at::IntArrayRef{heads} || D->sizes() == at::IntArrayRef({heads, headdim}), kOp,
                      ": D must have shape (", heads, ",) or (", heads, ", ", headdim, "), got ", D->sizes());
  }
  if (dt_bias) check_shape(kOp, {*dt_bias, "dt_bias"}, {heads}, "(nheads,)");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::optional<at::Tensor> initial;
  if (initial_states) {
    check_floating(kOp, {*initial_states, "initial_states"});
    check_same_device(kOp, {x, "x"}, {*initial_states, "initial_states"});
    check_shape(kOp, {*initial_states, "initial_states"}, {batch, heads, headdim, dstate},
                "(batch, nheads, headdim, dstate)");
    initial = initial_states->to(acc).contiguous();
  }
  std::optional<at::Tensor> seq;
  if (seq_idx) seq = checked_seq_idx(kOp, *seq_idx, {x, "x"}, batch, seqlen);
  // D per row: a per-head D (or the zeros of an absent one) repeats over the head's headdim rows.
  const at::Tensor D_rows = parameter(D, "D", x, D && D->dim() == 2 ? heads * headdim : heads, acc)
                                .reshape({heads, -1})
                                .expand({heads, headdim})
                                .reshape({heads * headdim})
                                .contiguous();
  SsdArgs args{batch, seqlen, heads, headdim, groups, dstate, softplus,
               x.contiguous(), dt.contiguous(), z ? std::optional<at::Tensor>(z->contiguous()) : std::nullopt,
               A.to(acc).contiguous(), B.to(acc).contiguous(), C.to(acc).contiguous(), D_rows,
               parameter(dt_bias, "dt_bias", x, heads, acc), initial, seq};
  if (cu_seqlens) add_packing(args, *cu_seqlens, x);
  return args;
}

std::vector<int64_t> checkpoint_shape(const SsdArgs& in) {
  return {in.batch, in.heads, num_checkpoints(in.seqlen), in.headdim, in.dstate};
}

std::vector<int64_t> state_shape(const SsdArgs& in) { return {in.batch, in.heads, in.headdim, in.dstate}; }

std::vector<int64_t> varlen_shape(const SsdArgs& in) { return {in.num_seqs, in.heads, in.headdim, in.dstate}; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ssd_scan_forward(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& initial_states, bool dt_softplus, const std::optional<at::Tensor>& seq_idx,
    const std::optional<at::Tensor>& cu_seqlens, SsdForwardKernel kernel) {
  SsdArgs in = make_args(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, seq_idx, cu_seqlens);
  const auto acc = in.A.options();
  in.checkpoints = at::empty(checkpoint_shape(in), acc);
  SsdForwardArgs args{in, at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)),
                      at::empty(state_shape(in), acc), at::zeros(varlen_shape(in), acc)};
  if (in.batch * in.seqlen * in.heads * in.headdim > 0) {
    // Either writes every checkpoint and the final state.
    if (chosen_impl(in) == Impl::kChunked) forward_chunked(args);
    else kernel(args);
  } else {          // nothing to scan: the start state (or zero) passes through
    const at::Tensor start = in.initial_states ? *in.initial_states : at::zeros(state_shape(in), acc);
    args.final_state.copy_(start);
    in.checkpoints.zero_();
    if (in.seqlen == 0) in.checkpoints.select(2, 0).copy_(start);
  }
  return {args.out, in.checkpoints, args.final_state, args.varlen_states};
}

std::vector<at::Tensor> ssd_scan_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final, const at::Tensor& x,
    const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& initial_states, const at::Tensor& checkpoints, bool dt_softplus,
    const std::optional<at::Tensor>& seq_idx, const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& grad_varlen, SsdBackwardKernel kernel) {
  SsdArgs in = make_args(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, seq_idx, cu_seqlens);
  check_same_device(kOp, {x, "x"}, {checkpoints, "checkpoints"});
  check_shape(kOp, {checkpoints, "checkpoints"}, checkpoint_shape(in),
              "(batch, nheads, num_checkpoints, headdim, dstate), as the forward returned");
  SHAMMIE_CHECK_TYPE(checkpoints.scalar_type() == in.A.scalar_type(), kOp, ": checkpoints must be ",
                   in.A.scalar_type(), ", as the forward returned, got ", checkpoints.scalar_type());
  in.checkpoints = checkpoints.contiguous();
  check_same_device(kOp, {x, "x"}, {grad_out, "grad_out"});
  check_shape(kOp, {grad_out, "grad_out"}, x.sizes(), "(batch, seqlen, nheads, headdim) like x");
  check_same_dtype(kOp, {x, "x"}, {grad_out, "grad_out"});
  std::optional<at::Tensor> grad_fin;
  if (grad_final) {
    check_same_device(kOp, {x, "x"}, {*grad_final, "grad_final"});
    check_shape(kOp, {*grad_final, "grad_final"}, state_shape(in), "(batch, nheads, headdim, dstate)");
    grad_fin = grad_final->to(in.A.scalar_type()).contiguous();
  }
  std::optional<at::Tensor> grad_var;
  if (grad_varlen) {
    SHAMMIE_CHECK_VALUE(cu_seqlens, kOp, ": grad_varlen needs the cu_seqlens of the forward");
    check_same_device(kOp, {x, "x"}, {*grad_varlen, "grad_varlen"});
    check_shape(kOp, {*grad_varlen, "grad_varlen"}, varlen_shape(in), "(num_seqs, nheads, headdim, dstate)");
    grad_var = grad_varlen->to(in.A.scalar_type()).contiguous();
  }
  const auto like = [](const at::Tensor& t) { return at::empty(t.sizes(), t.options()); };
  SsdBackwardArgs args{in, grad_out.contiguous(), grad_fin, grad_var, like(in.x), like(in.dt),
                       z ? std::optional<at::Tensor>(like(in.x)) : std::nullopt,
                       at::zeros_like(in.A), at::zeros_like(in.B), at::zeros_like(in.C), at::zeros_like(in.D),
                       at::zeros_like(in.dt_bias),
                       initial_states ? std::optional<at::Tensor>(at::empty(state_shape(in), in.A.options()))
                                      : std::nullopt};
  if (in.batch * in.seqlen * in.heads * in.headdim > 0) {
    if (chosen_impl(in) == Impl::kChunked) backward_chunked(args);
    else kernel(args);
  } else {
    args.dx.zero_();
    args.ddt.zero_();
    if (args.dz) args.dz->zero_();
    if (args.dinitial_states) {  // an empty sequence passes the state through
      if (grad_fin && in.seqlen == 0) args.dinitial_states->copy_(*grad_fin);
      else args.dinitial_states->zero_();
    }
  }
  // Back to the inputs' shapes and dtypes: D per head sums its rows.
  at::Tensor dD = args.dD;
  if (D) dD = (D->dim() == 1 ? dD.reshape({in.heads, in.headdim}).sum(1) : dD.reshape(D->sizes())).to(D->scalar_type());
  const auto empty = at::empty({0}, x.options());
  return {args.dx,
          args.ddt,
          args.dA.to(A.scalar_type()),
          args.dB.to(B.scalar_type()),
          args.dC.to(C.scalar_type()),
          dD,
          args.dz ? *args.dz : empty,
          args.ddt_bias,
          args.dinitial_states ? args.dinitial_states->to(initial_states->scalar_type()) : empty};
}

}  // namespace ssd

namespace {
void forward_cpu(const ssd::SsdForwardArgs& a) { SHAMMIE_CPU_DISPATCH(ssd_scan_forward, a); }
void backward_cpu(const ssd::SsdBackwardArgs& a) { SHAMMIE_CPU_DISPATCH(ssd_scan_backward, a); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(shammie, m) {
  m.def(
      "ssd_scan(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, "
      "Tensor? initial_states, bool dt_softplus, Tensor? seq_idx=None, Tensor? cu_seqlens=None) -> (Tensor out, "
      "Tensor checkpoints, Tensor final_state, Tensor varlen_states)");
  m.def(
      "ssd_scan_backward(Tensor grad_out, Tensor? grad_final, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
      "Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? initial_states, Tensor checkpoints, bool dt_softplus, "
      "Tensor? seq_idx=None, Tensor? cu_seqlens=None, Tensor? grad_varlen=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(shammie, CPU, m) { ssd::register_kernels<forward_cpu, backward_cpu>(m); }

}  // namespace shammie
