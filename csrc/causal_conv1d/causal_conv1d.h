// Causal depthwise conv1d (the short convolution of Mamba blocks), causal-conv1d's contract:
//   pre[b, d, t] = bias[d] + Σ_{w < W} weight[d, w] · x[b, d, t − (W − 1) + w]   (x = 0 before t = 0)
//   out = silu(pre) if activation == "silu" else pre
// With packed sequences (seq_idx (batch, L)), a tap reads x[b, d, s] only if seq_idx[b, s] == seq_idx[b, t]:
// each sequence is convolved as if it started at zero.
// and the decode step, which runs the same window over [conv_state, x] and shifts x into the state
// (with conv_state_indices, batch element b uses row indices[b] of a larger state cache; −1 pads;
// with cache_seqlens, conv_state is a circular buffer: stream position c lives in slot c % state_len,
// and x's first step is position cache_seqlens[b], so the state is written, not shifted).
// This header holds what the CPU and CUDA kernels share: the per-element math, the argument
// structs and the front end.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "common/fast_math.h"
#include "common/host_device.h"

namespace shammie::conv1d {

template <typename T>
SHAMMIE_HD T sigmoid(T v) { return T(1) / (T(1) + vexp(-v)); }

template <typename T>
SHAMMIE_HD T activate(T pre, bool silu) { return silu ? pre * sigmoid(pre) : pre; }

// d out / d pre.
template <typename T>
SHAMMIE_HD T activation_grad(T pre, bool silu) {
  if (!silu) return T(1);
  const T s = sigmoid(pre);
  return s * (T(1) + pre * (T(1) - s));
}

// How far back tap w of a width-W window looks: x[t − lag(w)].
SHAMMIE_HD int64_t lag(int64_t w, int64_t width) { return width - 1 - w; }

// Whether output t may read input s = t − lag (0 ≤ s ≤ t): always without packed sequences (seq is
// null), else only within t's sequence. seq is the row's seq_idx.
SHAMMIE_HD bool same_sequence(const int64_t* seq, int64_t s, int64_t t) { return !seq || seq[s] == seq[t]; }

// A (batch, dim, length) tensor's strides, so that channel-last and sliced inputs need no copy.
struct Strides {
  int64_t batch, dim, time;
};

struct ForwardArgs {
  int64_t batch, dim, length, width;
  bool silu;
  at::Tensor x;                    // (batch, dim, length), any strides
  at::Tensor weight;               // (dim, width), contiguous
  std::optional<at::Tensor> bias;  // (dim,), contiguous
  std::optional<at::Tensor> seq_idx;  // (batch, length) int64, contiguous: packed sequences
  at::Tensor out;                  // like x, contiguous
};

struct BackwardArgs {
  ForwardArgs forward;             // its `out` is unused
  at::Tensor grad_out;             // (batch, dim, length), any strides
  at::Tensor grad_x;               // contiguous
  at::Tensor grad_weight;          // (dim, width)
  at::Tensor grad_bias;            // (dim,)
};

struct UpdateArgs {
  int64_t batch, dim, steps, width, state_len;
  bool silu;
  at::Tensor x;                    // (batch, dim, steps), any strides
  at::Tensor conv_state;           // (batch, dim, state_len), updated in place; any strides
  at::Tensor weight;
  std::optional<at::Tensor> bias;
  at::Tensor out;                  // (batch, dim, steps), contiguous
  std::optional<at::Tensor> state_rows;     // (batch,) int64: each element's conv_state row (−1: padding)
  std::optional<at::Tensor> cache_seqlens;  // (batch,) int64 ≥ 0: circular conv_state, x's stream position
};

// Slot of the circular conv_state holding entry j of the window [conv_state, x] (j < state_len: the
// state, oldest first). Without cache_seqlens the state is kept in order (start 0, shifted each step).
SHAMMIE_HD int64_t state_slot(int64_t start, int64_t j, int64_t state_len) { return (start + j) % state_len; }

// The oldest entry's slot of row b's circular state (0 without cache_seqlens, or without a state: width 1).
// A negative length, possible only unchecked inside a CUDA graph capture, reads as 0.
SHAMMIE_HD int64_t circular_start(const int64_t* cache_seqlens, int64_t b, int64_t state_len) {
  if (!cache_seqlens || state_len == 0 || cache_seqlens[b] < 0) return 0;
  return cache_seqlens[b] % state_len;
}

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

using ForwardKernel = void (*)(const ForwardArgs&);
using BackwardKernel = void (*)(const BackwardArgs&);
using UpdateKernel = void (*)(const UpdateArgs&);

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   bool silu, const std::optional<at::Tensor>& seq_idx, ForwardKernel kernel);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias, bool silu,
                                                        const std::optional<at::Tensor>& seq_idx,
                                                        BackwardKernel kernel);
at::Tensor update(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, bool silu,
                  const std::optional<at::Tensor>& conv_state_indices,
                  const std::optional<at::Tensor>& cache_seqlens, UpdateKernel kernel, bool values_on_host = true);

}  // namespace shammie::conv1d
