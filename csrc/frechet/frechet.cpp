// Fréchet-mean search: op schemas, the front end shared by CPU and CUDA (checks, candidate list,
// output allocation), and the CPU registration. Math in frechet.h; CPU kernels in
// frechet_cpu_kernels.cpp.
#include "frechet/frechet.h"

#include <ATen/ops/any.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/_unique.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace shammie {

SHAMMIE_DECLARE_CPU_KERNELS(void frechet_gemm_bias_topk(const frechet::Args& args);)

namespace frechet {
namespace {

// The candidate label ids, sorted and unique, from a bool mask (N,) or an int64 index tensor.
at::Tensor candidate_ids(const char* op, const at::Tensor& c, const at::Tensor& x, int64_t n) {
  check_same_device(op, {x, "x"}, {c, "candidates"});
  SHAMMIE_CHECK_VALUE(c.dim() == 1, op, ": candidates must be 1-D (a bool mask of shape (N,) or int64 label ids), ",
                    "got a tensor of shape ", c.sizes());
  if (c.scalar_type() == at::kBool) {
    SHAMMIE_CHECK_VALUE(c.size(0) == n, op, ": a bool candidates mask must have shape (N,) = (", n,
                      ",), got ", c.sizes());
    return at::nonzero(c).view({-1});
  }
  SHAMMIE_CHECK_TYPE(c.scalar_type() == at::kLong, op,
                   ": candidates must be a bool mask or an int64 (long) tensor of label ids, got ", c.scalar_type());
  if (c.numel() == 0) return c.contiguous();
  const at::Tensor ids = std::get<0>(at::_unique(c, /*sorted=*/true));
  const int64_t lo = ids[0].item<int64_t>(), hi = ids[-1].item<int64_t>();
  SHAMMIE_CHECK_VALUE(lo >= 0 && hi < n, op, ": candidates must be label ids in [0, N) = [0, ", n, "), got ids from ",
                    lo, " to ", hi);
  return ids;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> run(const char* op, const at::Tensor& x, const at::Tensor& w,
                                       const std::optional<at::Tensor>& bias, int64_t k,
                                       const std::optional<at::Tensor>& candidates, bool largest, const Device& device) {
  const char* xname = op[0] == 'f' ? "probs" : "x";
  const char* wname = op[0] == 'f' ? "sq_dists" : "w";
  check_rank(op, {x, xname}, 2, "(B, K)");
  check_floating(op, {x, xname});
  check_rank(op, {w, wname}, 2, "(K, N)");
  check_same_dtype(op, {x, xname}, {w, wname});
  check_same_device(op, {x, xname}, {w, wname});
  SHAMMIE_CHECK_VALUE(x.size(1) == w.size(0), op, ": ", xname, " is (B, K) = ", x.sizes(), " and ", wname,
                    " is (K, N) = ", w.sizes(), ": their K must match");
  const int64_t n = w.size(1);
  if (bias) {
    check_rank(op, {*bias, "bias"}, 1, "(N,)");
    check_same_dtype(op, {x, xname}, {*bias, "bias"});
    check_same_device(op, {x, xname}, {*bias, "bias"});
    SHAMMIE_CHECK_VALUE(bias->size(0) == n, op, ": bias must have shape (N,) = (", n, ",), got ", bias->sizes());
  }
  SHAMMIE_CHECK_VALUE(k >= 1, op, ": k must be at least 1, got ", k);
  std::optional<at::Tensor> ids;
  if (candidates) ids = candidate_ids(op, *candidates, x, n);
  const int64_t count = ids ? ids->numel() : n;
  SHAMMIE_CHECK_VALUE(k <= count, op, ": k = ", k, " is more than the number of candidate labels (", count, ")");
  std::optional<at::Tensor> b;
  if (bias) b = bias->contiguous();
  Args args{x.size(0), x.size(1), n, count, k, largest, x.contiguous(), w.contiguous(), b, ids,
            at::empty({x.size(0), k}, x.options()), at::empty({x.size(0), k}, x.options().dtype(at::kLong))};
  if (args.batch == 0) return {args.values, args.indices};
  if (chosen_impl(args, x.is_cuda()) == Impl::kGemm) {
    const c10::OptionalDeviceGuard guard(x.device());   // the GEMM path's own kernels launch on x's device
    topk_gemm(args, device.gemm);
  } else {
    device.kernel(args);
  }
  return {args.values, args.indices};
}

std::tuple<at::Tensor, at::Tensor> gemm_bias_topk(const at::Tensor& x, const at::Tensor& w,
                                                  const std::optional<at::Tensor>& bias, int64_t k,
                                                  const std::optional<at::Tensor>& candidates, bool largest,
                                                  const Device& device) {
  return run("gemm_bias_topk", x, w, bias, k, candidates, largest, device);
}

std::tuple<at::Tensor, at::Tensor> frechet_topk(const at::Tensor& probs, const at::Tensor& sq_dists, int64_t k,
                                                const std::optional<at::Tensor>& candidates, const Device& device) {
  constexpr const char* op = "frechet_topk";
  check_floating(op, {probs, "probs"});
  // Value-dependent (one device sync on CUDA): Fréchet weights must be non-negative numbers.
  SHAMMIE_CHECK_VALUE(!at::any(at::lt(probs, 0).logical_or_(at::isnan(probs))).item<bool>(), op,
                    ": probs must be non-negative with no NaN");
  return run(op, probs, sq_dists, std::nullopt, k, candidates, false, device);
}

}  // namespace frechet

namespace {
void topk_cpu(const frechet::Args& a) { SHAMMIE_CPU_DISPATCH(frechet_gemm_bias_topk, a); }
const frechet::Device kCpu{topk_cpu, frechet::kCpuGemmSelect};
}  // namespace

TORCH_LIBRARY_FRAGMENT(shammie, m) {
  m.def("frechet_topk(Tensor probs, Tensor sq_dists, int k, Tensor? candidates) -> (Tensor, Tensor)");
  m.def(
      "gemm_bias_topk(Tensor x, Tensor w, Tensor? bias, int k, Tensor? candidates, bool largest) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shammie, CPU, m) {
  m.impl("frechet_topk", [](const at::Tensor& p, const at::Tensor& d, int64_t k, const std::optional<at::Tensor>& c) {
    return frechet::frechet_topk(p, d, k, c, kCpu);
  });
  m.impl("gemm_bias_topk", [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t k,
                              const std::optional<at::Tensor>& c, bool largest) {
    return frechet::gemm_bias_topk(x, w, b, k, c, largest, kCpu);
  });
}

}  // namespace shammie
