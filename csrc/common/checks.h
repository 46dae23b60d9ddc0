// Argument checks shared by every op's front end. Each error names the op, the argument and what
// was expected, so that a user sees e.g. "blockdiag_butterfly_multiply: w1_bfly must be 3-D ...".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/errors.h"

#include <algorithm>
#include <string_view>
#include <vector>

namespace shammie {

struct Arg {
  const at::Tensor& tensor;
  const char* name;
};

inline void check_rank(const char* op, Arg a, int64_t rank, const char* layout) {
  SHAMMIE_CHECK_VALUE(a.tensor.dim() == rank, op, ": ", a.name, " must be ", rank, "-D ", layout,
                    ", got a tensor of shape ", a.tensor.sizes());
}

inline void check_min_rank(const char* op, Arg a, int64_t rank, const char* layout) {
  SHAMMIE_CHECK_VALUE(a.tensor.dim() >= rank, op, ": ", a.name, " must have at least ", rank,
                    " dimension(s) ", layout, ", got a tensor of shape ", a.tensor.sizes());
}

// float32, float16, bfloat16 and float64 (the last for gradcheck and numpy-born data).
inline void check_floating(const char* op, Arg a) {
  const auto t = a.tensor.scalar_type();
  SHAMMIE_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, op,
                   ": ", a.name, " must be float32, float16, bfloat16 or float64, got ", t);
}

inline void check_shape(const char* op, Arg a, at::IntArrayRef expected, const char* layout) {
  SHAMMIE_CHECK_VALUE(a.tensor.sizes() == expected, op, ": ", a.name, " must have shape ", layout, " = ", expected,
                    ", got ", a.tensor.sizes());
}

inline void check_same_dtype(const char* op, Arg a, Arg b) {
  SHAMMIE_CHECK_TYPE(a.tensor.scalar_type() == b.tensor.scalar_type(), op, ": ", b.name,
                   " must have the same dtype as ", a.name, " (", a.tensor.scalar_type(), "), got ",
                   b.tensor.scalar_type());
}

inline void check_same_device(const char* op, Arg a, Arg b) {
  SHAMMIE_CHECK_VALUE(a.tensor.device() == b.tensor.device(), op, ": ", b.name,
                    " must be on the same device as ", a.name, " (", a.tensor.device(), "), got ",
                    b.tensor.device());
}

// seq_idx of packed sequences (mamba_ssm's and causal-conv1d's): (batch, seqlen) int32 or int64 ids,
// on x's device; returned as contiguous int64 for the kernels.
inline at::Tensor checked_seq_idx(const char* op, const at::Tensor& seq_idx, Arg x, int64_t batch, int64_t seqlen) {
  check_same_device(op, x, {seq_idx, "seq_idx"});
  SHAMMIE_CHECK_TYPE(seq_idx.scalar_type() == at::kInt || seq_idx.scalar_type() == at::kLong, op,
                   ": seq_idx must be int32 or int64, got ", seq_idx.scalar_type());
  SHAMMIE_CHECK_VALUE(seq_idx.dim() == 2 && seq_idx.size(0) == batch && seq_idx.size(1) == seqlen, op,
                    ": seq_idx must have shape (batch, seqlen) = (", batch, ", ", seqlen, "), got ", seq_idx.sizes());
  return seq_idx.to(at::kLong).contiguous();
}

// A per-batch-element int vector (state rows, cache lengths): (batch,) int32 or int64 on x's device,
// returned as contiguous int64. Its values are the caller's to check.
inline at::Tensor checked_batch_vector(const char* op, const at::Tensor& t, const char* name, Arg x, int64_t batch) {
  check_same_device(op, x, {t, name});
  SHAMMIE_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
                   " must be int32 or int64, got ", t.scalar_type());
  SHAMMIE_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch, op, ": ", name, " must have shape (batch,) = (", batch,
                    ",), got ", t.sizes());
  return t.to(at::kLong).contiguous();
}

// A decode step's state rows under continuous batching (mamba_ssm's state_batch_indices,
// causal-conv1d's conv_state_indices): (batch,) int32 or int64 on x's device, each a row of the state
// cache in [0, state_rows) or −1 for a padding row, and no row named twice (two batch elements would
// race on it). The values are checked on the host, so from a GPU this is one small copy and a sync
// per call; `values_on_host` false skips that (inside a CUDA graph capture, where no sync is allowed:
// the kernels then treat a row outside the cache as padding). Returned as contiguous int64.
inline at::Tensor checked_state_indices(const char* op, const at::Tensor& indices, const char* name, Arg x,
                                        int64_t batch, int64_t state_rows, bool values_on_host = true) {
  const at::Tensor as_long = checked_batch_vector(op, indices, name, x, batch);
  if (!values_on_host) return as_long;
  const at::Tensor host = as_long.to(at::kCPU);
  std::vector<int64_t> rows(host.const_data_ptr<int64_t>(), host.const_data_ptr<int64_t>() + batch);
  for (int64_t b = 0; b < batch; ++b) {
    SHAMMIE_CHECK_VALUE(rows[b] >= -1 && rows[b] < state_rows, op, ": ", name, "[", b, "] = ", rows[b],
                      " is not a state row in [0, ", state_rows, ") or -1 (padding)");
  }
  std::sort(rows.begin(), rows.end());
  const auto same_row = [](int64_t a, int64_t b) { return a >= 0 && a == b; };
  const auto twice = std::adjacent_find(rows.begin(), rows.end(), same_row);
  SHAMMIE_CHECK_VALUE(twice == rows.end(), op, ": ", name, " names state row ", twice == rows.end() ? 0 : *twice,
                    " twice (each batch element needs its own state row)");
  return as_long;
}

}  // namespace shammie
