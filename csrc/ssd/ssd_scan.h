// ssd_scan: Mamba-2's selective scan ("SSD"), mamba_ssm's mamba_chunk_scan_combined contract
// (shammie/mamba2.py adds dt_limit). Heads h of headdim P share one scalar decay; B and C are shared
// by the heads of a group g = h / (H / G). For each (batch b, head h, row p, state n), t = 0..L−1:
//   dt_t = softplus(dt[b,t,h] + dt_bias_h) (or without softplus),  a_t = exp(dt_t·A_h)
//   S_t[p,n] = a_t·S_{t−1}[p,n] + dt_t·x_t[p]·B_t[g,n],   S_{−1} = initial state (or 0)
//   y_t[p] = Σ_n C_t[g,n]·S_t[p,n] + D[h,p]·x_t[p],   out = y·silu(z) when z is given.
// Packed sequences (seq_idx (batch, L)): a step whose id differs from the previous step's starts a new
// sequence, a_t = 0 there, so no state (and, in the backward, no gradient) crosses it.
// With cu_seqlens (batch 1), the forward also writes each sequence's final state ("varlen states"):
// the kernels get a per-step slot map, the sequence whose last step t is (or −1), copy S_t out at
// those steps, and in the backward add the varlen state's gradient to G at the same steps.
//
// Each row p is an independent recurrence over the N-vector S[p,:] with a scalar decay, so the
// kernels run rows in parallel and vectorize over n (CPU) or put n on threads (CUDA). The forward
// saves the state at the start of every checkpoint interval of kInterval steps; the backward
// recomputes one interval at a time from those and sweeps it in reverse:
//   G ← grad of the final state;  for t descending:  G += dy_t·C_t;  (gradients of step t from G,
//   S_t, S_{t−1});  G ← a_t·G.   At the end, G is the gradient of the initial state.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "common/host_device.h"

namespace shammie::ssd {

constexpr int64_t kMaxDstate = 256;
constexpr int64_t kInterval = 128;   // steps between saved states: about N/128 floats per activation

SHAMMIE_HD int64_t num_checkpoints(int64_t seqlen) { return seqlen == 0 ? 1 : (seqlen + kInterval - 1) / kInterval; }

// What the kernels see, after the front end's checks. Activations keep mamba_ssm's layouts and are
// contiguous: x, z (batch, L, H, P) and dt (batch, L, H) in the input dtype; B, C (batch, L, G, N)
// in the accumulation dtype (float, or double for float64 inputs), like every parameter.
struct SsdArgs {
  int64_t batch, seqlen, heads, headdim, groups, dstate;
  bool softplus;
  at::Tensor x, dt;
  std::optional<at::Tensor> z;
  at::Tensor A;                               // (H,)
  at::Tensor B, C;                            // (batch, L, G, N)
  at::Tensor D;                               // (H·P,), per row (zeros when absent)
  at::Tensor dt_bias;                         // (H,) (zeros when absent)
  std::optional<at::Tensor> initial_states;   // (batch, H, P, N)
  std::optional<at::Tensor> seq_idx;          // (batch, L) int64: packed sequences
  std::optional<at::Tensor> state_slot;       // (batch, L) int64: the sequence ending at step t, or −1
  int64_t num_seqs = 0;                       // varlen states (cu_seqlens' length − 1; 0 without it)
  std::vector<int64_t> seq_ends;              // host copy: each sequence's last step, or −1 when empty
  at::Tensor checkpoints;                     // (batch, H, num_checkpoints, P, N): k holds the state
                                              // before step k·kInterval (k = 0: the initial state)
  int64_t heads_per_group() const { return heads / groups; }
};

// Offsets into the layouts above, shared by the CPU and CUDA kernels (int64: batch·L·H·P may exceed
// 2^31). Each points at row 0 / state 0 of its (batch, step, head); add the row p or state n.
struct Layout {
  int64_t L, H, P, G, N, heads_per_group, n_cp;
  SHAMMIE_HD int64_t x_at(int64_t b, int64_t t, int64_t h) const { return ((b * L + t) * H + h) * P; }   // x, z, out
  SHAMMIE_HD int64_t dt_at(int64_t b, int64_t t, int64_t h) const { return (b * L + t) * H + h; }
  SHAMMIE_HD int64_t bc_at(int64_t b, int64_t t, int64_t h) const {   // B, C of head h's group
    return ((b * L + t) * G + h / heads_per_group) * N;
  }
  SHAMMIE_HD int64_t state_at(int64_t b, int64_t h) const { return (b * H + h) * P * N; }        // (batch, H, P, N)
  SHAMMIE_HD int64_t checkpoint_at(int64_t b, int64_t h, int64_t k) const { return ((b * H + h) * n_cp + k) * P * N; }
  SHAMMIE_HD int64_t varlen_at(int64_t s, int64_t h) const { return (s * H + h) * P * N; }     // (num_seqs, H, P, N)
};

// The inputs as raw pointers for the kernels of either device (null where an optional one is absent).
template <typename scalar_t, typename acc_t>
struct SsdInputs {
  const scalar_t* x;
  const scalar_t* dt;
  const scalar_t* z;
  const acc_t* A;
  const acc_t* B;
  const acc_t* C;
  const acc_t* D;
  const acc_t* dt_bias;
  const acc_t* initial_states;
  const int64_t* seq_idx;
  const int64_t* state_slot;

  static SsdInputs of(const SsdArgs& a) {
    return {a.x.const_data_ptr<scalar_t>(), a.dt.const_data_ptr<scalar_t>(),
            a.z ? a.z->const_data_ptr<scalar_t>() : nullptr, a.A.const_data_ptr<acc_t>(),
            a.B.const_data_ptr<acc_t>(), a.C.const_data_ptr<acc_t>(), a.D.const_data_ptr<acc_t>(),
            a.dt_bias.const_data_ptr<acc_t>(),
            a.initial_states ? a.initial_states->const_data_ptr<acc_t>() : nullptr,
            a.seq_idx ? a.seq_idx->const_data_ptr<int64_t>() : nullptr,
            a.state_slot ? a.state_slot->const_data_ptr<int64_t>() : nullptr};
  }
};

// Whether step t of batch b starts a new packed sequence (seq_idx (batch, L), or null: never).
SHAMMIE_HD bool starts_sequence(const int64_t* seq_idx, int64_t L, int64_t b, int64_t t) {
  return seq_idx != nullptr && t > 0 && seq_idx[b * L + t] != seq_idx[b * L + t - 1];
}

inline Layout layout_of(const SsdArgs& a) {
  return {a.seqlen, a.heads, a.headdim, a.groups, a.dstate, a.heads_per_group(), num_checkpoints(a.seqlen)};
}

struct SsdForwardArgs {
  SsdArgs in;
  at::Tensor out;           // (batch, L, H, P), input dtype
  at::Tensor final_state;   // (batch, H, P, N), accumulation dtype
  at::Tensor varlen_states; // (num_seqs, H, P, N), accumulation dtype, zero-filled (an empty sequence's)
};

// Gradient outputs arrive zero-filled where they accumulate (dA, dB, dC, dD, ddt_bias); the kernel
// writes every element of dx, ddt, dz and dinitial_states.
struct SsdBackwardArgs {
  SsdArgs in;
  at::Tensor grad_out;                        // (batch, L, H, P), input dtype
  std::optional<at::Tensor> grad_final;       // (batch, H, P, N), accumulation dtype
  std::optional<at::Tensor> grad_varlen;      // (num_seqs, H, P, N), accumulation dtype
  at::Tensor dx, ddt;                         // like x, dt (input dtype)
  std::optional<at::Tensor> dz;               // when z is given
  at::Tensor dA, dB, dC, dD, ddt_bias;        // like in.A, in.B, in.C, in.D, in.dt_bias
  std::optional<at::Tensor> dinitial_states;  // when initial states are given
};

// Two implementations: the recurrence kernels of each device (ssd_scan_cpu_kernels.cpp,
// ssd_scan_cuda.cuh), and the chunked matrix-product form (ssd_chunked.cpp, ATen ops on either device).
// SHAMMIE_SSD_IMPL=kernel|chunked forces one; auto: chosen_impl in ssd_chunked.cpp.
enum class Impl { kKernel, kChunked };   // in SHAMMIE_SSD_IMPL's order of names
Impl chosen_impl(const SsdArgs& a);
void forward_chunked(const SsdForwardArgs& args);
void backward_chunked(const SsdBackwardArgs& args);

using SsdForwardKernel = void (*)(const SsdForwardArgs&);
using SsdBackwardKernel = void (*)(const SsdBackwardArgs&);

// Return (out, checkpoints, final_state, varlen_states); varlen_states is (0, H, P, N) without cu_seqlens.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ssd_scan_forward(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& initial_states, bool dt_softplus, const std::optional<at::Tensor>& seq_idx,
    const std::optional<at::Tensor>& cu_seqlens, SsdForwardKernel kernel);

// Return (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states); dz and dinitial_states are empty
// when z / initial_states are absent; dD has D's shape.
std::vector<at::Tensor> ssd_scan_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final, const at::Tensor& x,
    const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& initial_states, const at::Tensor& checkpoints, bool dt_softplus,
    const std::optional<at::Tensor>& seq_idx, const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& grad_varlen, SsdBackwardKernel kernel);

}  // namespace shammie::ssd
