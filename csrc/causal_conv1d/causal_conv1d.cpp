// Causal conv1d: op schemas, the front end shared by CPU and CUDA (checks, output allocation), and
// the CPU registration. Math in causal_conv1d.h; CPU kernels in causal_conv1d_cpu_kernels.cpp.
#include "causal_conv1d/causal_conv1d.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace shammie {

SHAMMIE_DECLARE_CPU_KERNELS(void causal_conv1d_forward(const conv1d::ForwardArgs& args);
                            void causal_conv1d_backward(const conv1d::BackwardArgs& args);
                            void causal_conv1d_update(const conv1d::UpdateArgs& args);)

namespace conv1d {
namespace {

void check_weight_and_bias(const char* op, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t dim) {
  check_rank(op, {weight, "weight"}, 2, "(dim, width)");
  check_same_dtype(op, {x, "x"}, {weight, "weight"});
  check_same_device(op, {x, "x"}, {weight, "weight"});
  SHAMMIE_CHECK_VALUE(weight.size(0) == dim, op, ": weight must have shape (dim, width) with dim = ", dim,
                    " (x's dimension 1), got ", weight.sizes());
  SHAMMIE_CHECK_VALUE(weight.size(1) >= 1, op, ": weight's width must be at least 1, got ", weight.sizes());
  if (bias) {
    check_rank(op, {*bias, "bias"}, 1, "(dim,)");
    check_same_dtype(op, {x, "x"}, {*bias, "bias"});
    check_same_device(op, {x, "x"}, {*bias, "bias"});
    SHAMMIE_CHECK_VALUE(bias->size(0) == dim, op, ": bias must have shape (", dim, ",), got ", bias->sizes());
  }
}

ForwardArgs forward_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, bool silu, const std::optional<at::Tensor>& seq_idx) {
  check_rank(op, {x, "x"}, 3, "(batch, dim, seqlen)");
  check_floating(op, {x, "x"});
  check_weight_and_bias(op, x, weight, bias, x.size(1));
  std::optional<at::Tensor> b, seq;
  if (bias) b = bias->contiguous();
  if (seq_idx) seq = checked_seq_idx(op, *seq_idx, {x, "x"}, x.size(0), x.size(2));
  return ForwardArgs{x.size(0), x.size(1), x.size(2), weight.size(1), silu, x, weight.contiguous(), b, seq,
                     at::Tensor()};
}

}  // namespace

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   bool silu, const std::optional<at::Tensor>& seq_idx, ForwardKernel kernel) {
  ForwardArgs args = forward_args("causal_conv1d", x, weight, bias, silu, seq_idx);
  args.out = at::empty(x.sizes(), x.options());
  if (args.out.numel() > 0) kernel(args);
  return args.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias, bool silu,
                                                        const std::optional<at::Tensor>& seq_idx,
                                                        BackwardKernel kernel) {
  constexpr const char* op = "causal_conv1d_backward";
  ForwardArgs fwd = forward_args(op, x, weight, bias, silu, seq_idx);
  check_same_dtype(op, {x, "x"}, {grad_out, "grad_out"});
  check_same_device(op, {x, "x"}, {grad_out, "grad_out"});
  SHAMMIE_CHECK_VALUE(grad_out.sizes() == x.sizes(), op, ": grad_out must have x's shape ", x.sizes(),
                    ", got ", grad_out.sizes());
  BackwardArgs args{fwd, grad_out, at::empty(x.sizes(), x.options()), at::zeros(weight.sizes(), weight.options()),
                    at::zeros({fwd.dim}, weight.options())};
  if (x.numel() > 0) kernel(args);
  return {args.grad_x, args.grad_weight, args.grad_bias};
}

// cache_seqlens (batch,) int32 or int64, each ≥ 0; checked on the host (from a GPU: a small copy and a sync)
// unless values_on_host is false (a CUDA graph capture: the kernels then read a negative length as 0).
at::Tensor checked_cache_seqlens(const char* op, const at::Tensor& lengths, const at::Tensor& x, int64_t batch,
                                 bool values_on_host) {
  const at::Tensor as_long = checked_batch_vector(op, lengths, "cache_seqlens", {x, "x"}, batch);
  if (!values_on_host) return as_long;
  const at::Tensor host = as_long.to(at::kCPU);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t c = host.const_data_ptr<int64_t>()[b];
    SHAMMIE_CHECK_VALUE(c >= 0, op, ": cache_seqlens[", b, "] = ", c, " must be >= 0");
  }
  return as_long;
}

at::Tensor update(const at::Tensor& x_in, const at::Tensor& conv_state, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, bool silu,
                  const std::optional<at::Tensor>& conv_state_indices,
                  const std::optional<at::Tensor>& cache_seqlens, UpdateKernel kernel, bool values_on_host) {
  constexpr const char* op = "causal_conv1d_update";
  SHAMMIE_CHECK_VALUE(x_in.dim() == 2 || x_in.dim() == 3, op,
                    ": x must be (batch, dim) or (batch, dim, seqlen), got a tensor of shape ", x_in.sizes());
  check_floating(op, {x_in, "x"});
  const at::Tensor x = x_in.dim() == 2 ? x_in.unsqueeze(-1) : x_in;
  check_rank(op, {conv_state, "conv_state"}, 3, "(batch, dim, state_len)");
  check_same_dtype(op, {x, "x"}, {conv_state, "conv_state"});
  check_same_device(op, {x, "x"}, {conv_state, "conv_state"});
  check_weight_and_bias(op, x, weight, bias, x.size(1));
  if (conv_state_indices) {   // conv_state is a cache with any number of rows
    SHAMMIE_CHECK_VALUE(conv_state.size(1) == x.size(1), op,
                      ": conv_state must be (cache_rows, dim, state_len) with dim = ", x.size(1), ", got ",
                      conv_state.sizes());
  } else {
    SHAMMIE_CHECK_VALUE(conv_state.size(0) == x.size(0) && conv_state.size(1) == x.size(1), op,
                      ": conv_state must be (batch, dim, state_len) = (", x.size(0), ", ", x.size(1),
                      ", state_len), got ", conv_state.sizes());
  }
  SHAMMIE_CHECK_VALUE(conv_state.size(2) >= weight.size(1) - 1, op, ": conv_state's state_len (",
                    conv_state.size(2), ") must be at least width - 1 = ", weight.size(1) - 1);
  std::optional<at::Tensor> b;
  if (bias) b = bias->contiguous();
  UpdateArgs args{x.size(0), x.size(1), x.size(2), weight.size(1), conv_state.size(2), silu, x, conv_state,
                  weight.contiguous(), b, at::empty(x.sizes(), x.options())};
  if (conv_state_indices) {
    args.state_rows = checked_state_indices(op, *conv_state_indices, "conv_state_indices", {x_in, "x"}, x.size(0),
                                            conv_state.size(0), values_on_host);
  }
  if (cache_seqlens) args.cache_seqlens = checked_cache_seqlens(op, *cache_seqlens, x, x.size(0), values_on_host);
  if (args.out.numel() > 0) kernel(args);
  return x_in.dim() == 2 ? args.out.squeeze(-1) : args.out;
}

}  // namespace conv1d

namespace {
void forward_cpu(const conv1d::ForwardArgs& a) { SHAMMIE_CPU_DISPATCH(causal_conv1d_forward, a); }
void backward_cpu(const conv1d::BackwardArgs& a) { SHAMMIE_CPU_DISPATCH(causal_conv1d_backward, a); }
void update_cpu(const conv1d::UpdateArgs& a) { SHAMMIE_CPU_DISPATCH(causal_conv1d_update, a); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(shammie, m) {
  m.def("causal_conv1d(Tensor x, Tensor weight, Tensor? bias, bool silu, Tensor? seq_idx=None) -> Tensor");
  m.def(
      "causal_conv1d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, bool silu, "
      "Tensor? seq_idx=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu, "
      "Tensor? conv_state_indices=None, Tensor? cache_seqlens=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(shammie, CPU, m) {
  m.impl("causal_conv1d", [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                             bool silu, const std::optional<at::Tensor>& seq) {
    return conv1d::forward(x, w, b, silu, seq, forward_cpu);
  });
  m.impl("causal_conv1d_backward",
         [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
            bool silu, const std::optional<at::Tensor>& seq) {
           return conv1d::backward(g, x, w, b, silu, seq, backward_cpu);
         });
  m.impl("causal_conv1d_update",
         [](const at::Tensor& x, const at::Tensor& state, const at::Tensor& w, const std::optional<at::Tensor>& b,
            bool silu, const std::optional<at::Tensor>& rows, const std::optional<at::Tensor>& lengths) {
           return conv1d::update(x, state, w, b, silu, rows, lengths, update_cpu);
         });
}

}  // namespace shammie
