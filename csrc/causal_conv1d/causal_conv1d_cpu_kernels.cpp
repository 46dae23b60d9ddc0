// CPU kernels of causal conv1d (math in causal_conv1d.h), compiled once per instruction set.
// Parallel over (batch, dim) rows. Each row is staged once into a buffer with W − 1 leading zeros,
// xp[W − 1 + t] = x[t], so tap w of output t reads xp[t + w] with no bounds test and the loops over
// time vectorize. The backward recomputes the pre-activation rather than storing it. Packed
// sequences multiply each tap by a 0/1 mask per (batch, tap, output step), built once per call.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "causal_conv1d/causal_conv1d.h"
#include "common/cpu_convert.h"
#include "common/cpu_isa.h"

SHAMMIE_CPU_TARGET_BEGIN

namespace shammie::SHAMMIE_CPU_NAMESPACE {
namespace {

using namespace conv1d;

// dst[lead + t] = src[t·stride] for t < n, dst[0 .. lead) = 0.
template <typename scalar_t, typename acc_t>
inline void stage_row(const scalar_t* src, int64_t stride, int64_t n, int64_t lead, acc_t* dst) {
  std::fill(dst, dst + lead, acc_t(0));
  if (stride == 1) {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) dst[lead + t] = from_storage<acc_t>(src[t]);
  } else {
    for (int64_t t = 0; t < n; ++t) dst[lead + t] = from_storage<acc_t>(src[t * stride]);
  }
}

// Tap masks of packed sequences: keep[(b·W + w)·(L + W − 1) + t] = 1 when tap w of output t reads
// an input of t's sequence (t − lag(w) ≥ 0 and the same seq_idx), else 0; zero for t ≥ L, so the
// transposed window of the backward may read up to L + W − 2. Empty without seq_idx.
template <typename acc_t>
std::vector<acc_t> tap_masks(const ForwardArgs& a) {
  if (!a.seq_idx) return {};
  const int64_t W = a.width, L = a.length, stride = L + W - 1;
  std::vector<acc_t> keep(static_cast<size_t>(a.batch * W * stride), acc_t(0));
  const int64_t* seq_idx = a.seq_idx->const_data_ptr<int64_t>();
  at::parallel_for(0, a.batch * W, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bw = begin; bw < end; ++bw) {
      const int64_t* seq = seq_idx + (bw / W) * L;
      const int64_t lag_w = lag(bw % W, W);
      acc_t* k = keep.data() + bw * stride;
      for (int64_t t = lag_w; t < L; ++t) k[t] = acc_t(same_sequence(seq, t - lag_w, t));
    }
  });
  return keep;
}

// pre[t] = bias + Σ_w weight[w] · keep_w[t] · xp[t + w]   for t < n (xp padded as above; keep_w =
// keep + w·keep_stride, or all ones when keep is null).
template <typename acc_t>
inline void window(const acc_t* xp, const acc_t* weight, int64_t width, acc_t bias, int64_t n, acc_t* pre,
                   const acc_t* keep = nullptr, int64_t keep_stride = 0) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) pre[t] = bias;
  for (int64_t w = 0; w < width; ++w) {
    const acc_t wv = weight[w];
    const acc_t* src = xp + w;
    if (keep) {
      const acc_t* k = keep + w * keep_stride;
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) pre[t] += wv * k[t] * src[t];
    } else {
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) pre[t] += wv * src[t];
    }
  }
}

template <typename scalar_t, typename acc_t>
struct RowParams {
  std::vector<acc_t> weight;  // (dim, width) in acc_t
  std::vector<acc_t> bias;    // (dim,), zeros without a bias
  RowParams(const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t dim)
      : weight(w.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>() + w.numel()), bias(dim, acc_t(0)) {
    if (b) std::copy(b->const_data_ptr<scalar_t>(), b->const_data_ptr<scalar_t>() + dim, bias.begin());
  }
};

inline int64_t row_grain(int64_t length) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(length, 1)); }

template <typename scalar_t>
void forward_typed(const ForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowParams<scalar_t, acc_t> params(a.weight, a.bias, a.dim);
  const Strides xs = strides_of(a.x);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
  const int64_t W = a.width, L = a.length, keep_stride = L + W - 1;
  const std::vector<acc_t> keep = tap_masks<acc_t>(a);
  at::parallel_for(0, a.batch * a.dim, row_grain(L), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xp(W - 1 + L), pre(L);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / a.dim, d = row % a.dim;
      const acc_t* keep_b = keep.empty() ? nullptr : keep.data() + b * W * keep_stride;
      stage_row(x + b * xs.batch + d * xs.dim, xs.time, L, W - 1, xp.data());
      window(xp.data(), params.weight.data() + d * W, W, params.bias[d], L, pre.data(), keep_b, keep_stride);
      scalar_t* o = out + row * L;
      if (a.silu) {
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) o[t] = to_storage<scalar_t>(activate(pre[t], true));
      } else {
        for (int64_t t = 0; t < L; ++t) o[t] = to_storage<scalar_t>(pre[t]);
      }
    }
  });
}

template <typename scalar_t>
void backward_typed(const BackwardArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  const ForwardArgs& a = args.forward;
  const RowParams<scalar_t, acc_t> params(a.weight, a.bias, a.dim);
  const Strides xs = strides_of(a.x), gs = strides_of(args.grad_out);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* gy = args.grad_out.const_data_ptr<scalar_t>();
  scalar_t* gx = args.grad_x.mutable_data_ptr<scalar_t>();
  const int64_t W = a.width, L = a.length, keep_stride = L + W - 1;
  const std::vector<acc_t> keep = tap_masks<acc_t>(a);
  // Weight and bias gradients per row, summed over the batch at the end (deterministic).
  std::vector<acc_t> gw_rows(a.batch * a.dim * W), gb_rows(a.batch * a.dim);

  at::parallel_for(0, a.batch * a.dim, row_grain(L), [&](int64_t begin, int64_t end) {
    // gp[t] = d loss / d pre[t], followed by W − 1 zeros so that tap w of grad x[t] reads gp[t + lag(w)].
    std::vector<acc_t> xp(W - 1 + L), pre(L), gp(L + W - 1, acc_t(0)), g(L);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / a.dim, d = row % a.dim;
      const acc_t* wd = params.weight.data() + d * W;
      const acc_t* keep_b = keep.empty() ? nullptr : keep.data() + b * W * keep_stride;
      stage_row(x + b * xs.batch + d * xs.dim, xs.time, L, W - 1, xp.data());
      stage_row(gy + b * gs.batch + d * gs.dim, gs.time, L, 0, g.data());
      window(xp.data(), wd, W, params.bias[d], L, pre.data(), keep_b, keep_stride);
      // Two plain loops (the activation branch hoisted, the sum apart) so that both vectorize.
      if (a.silu) {
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) gp[t] = g[t] * activation_grad(pre[t], true);
      } else {
        std::copy(g.begin(), g.end(), gp.begin());
      }
      acc_t gb = 0;
#pragma omp simd reduction(+ : gb)
      for (int64_t t = 0; t < L; ++t) gb += gp[t];
      gb_rows[row] = gb;
      for (int64_t w = 0; w < W; ++w) {   // grad weight[w] = Σ_t gp[t] · keep_w[t] · xp[t + w]
        acc_t sum = 0;
        const acc_t* src = xp.data() + w;
        if (keep_b) {
          const acc_t* k = keep_b + w * keep_stride;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < L; ++t) sum += gp[t] * k[t] * src[t];
        } else {
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < L; ++t) sum += gp[t] * src[t];
        }
        gw_rows[row * W + w] = sum;
      }
      // grad x[t] = Σ_w weight[w] · keep_w[t + lag(w)] · gp[t + lag(w)]
      std::fill(pre.begin(), pre.end(), acc_t(0));
      for (int64_t w = 0; w < W; ++w) {
        const acc_t wv = wd[w];
        const acc_t* src = gp.data() + lag(w, W);
        if (keep_b) {
          const acc_t* k = keep_b + w * keep_stride + lag(w, W);
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) pre[t] += wv * k[t] * src[t];
        } else {
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) pre[t] += wv * src[t];
        }
      }
      scalar_t* o = gx + row * L;
      for (int64_t t = 0; t < L; ++t) o[t] = to_storage<scalar_t>(pre[t]);
    }
  });

  scalar_t* gw = args.grad_weight.mutable_data_ptr<scalar_t>();
  scalar_t* gb = args.grad_bias.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, a.dim, 64, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) {
      acc_t bias_sum = 0;
      for (int64_t b = 0; b < a.batch; ++b) bias_sum += gb_rows[b * a.dim + d];
      gb[d] = to_storage<scalar_t>(bias_sum);
      for (int64_t w = 0; w < W; ++w) {
        acc_t sum = 0;
        for (int64_t b = 0; b < a.batch; ++b) sum += gw_rows[(b * a.dim + d) * W + w];
        gw[d * W + w] = to_storage<scalar_t>(sum);
      }
    }
  });
}

template <typename scalar_t>
void update_typed(const UpdateArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowParams<scalar_t, acc_t> params(a.weight, a.bias, a.dim);
  const Strides xs = strides_of(a.x), ss = strides_of(a.conv_state);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  scalar_t* state = a.conv_state.mutable_data_ptr<scalar_t>();
  scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
  const int64_t* state_rows = a.state_rows ? a.state_rows->const_data_ptr<int64_t>() : nullptr;
  const int64_t* cache_seqlens = a.cache_seqlens ? a.cache_seqlens->const_data_ptr<int64_t>() : nullptr;
  const int64_t W = a.width, S = a.state_len, n = a.steps;
  at::parallel_for(0, a.batch * a.dim, 256, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> seq(S + n), pre(n);   // [conv_state, x]
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / a.dim, d = row % a.dim, state_row = state_rows ? state_rows[b] : b;
      if (state_row < 0 || state_row >= a.conv_state.size(0)) {   // a padding element
        std::fill_n(out + row * n, n, to_storage<scalar_t>(acc_t(0)));
        continue;
      }
      scalar_t* st = state + state_row * ss.batch + d * ss.dim;
      const scalar_t* xr = x + b * xs.batch + d * xs.dim;
      const int64_t start = circular_start(cache_seqlens, b, S);   // circular: the oldest entry's slot
      if (cache_seqlens) {
        for (int64_t i = 0; i < S; ++i) seq[i] = from_storage<acc_t>(st[state_slot(start, i, S) * ss.time]);
      } else {
        for (int64_t i = 0; i < S; ++i) seq[i] = from_storage<acc_t>(st[i * ss.time]);
      }
      for (int64_t i = 0; i < n; ++i) seq[S + i] = from_storage<acc_t>(xr[i * xs.time]);
      // out[i] reads seq[S + i − lag(w)]; the window starts at S − (W − 1) ≥ 0.
      window(seq.data() + S - (W - 1), params.weight.data() + d * W, W, params.bias[d], n, pre.data());
      for (int64_t i = 0; i < n; ++i) out[row * n + i] = to_storage<scalar_t>(activate(pre[i], a.silu));
      if (cache_seqlens) {   // circular: x's last S steps go to their slots
        for (int64_t i = std::max<int64_t>(0, n - S); i < n; ++i)
          st[state_slot(start, i, S) * ss.time] = xr[i * xs.time];
      } else {               // in order: the window's last S entries
        for (int64_t i = 0; i < S; ++i) st[i * ss.time] = to_storage<scalar_t>(seq[n + i]);
      }
    }
  });
}

}  // namespace

void causal_conv1d_forward(const ForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "causal_conv1d_cpu",
                                  [&] { forward_typed<scalar_t>(args); });
}

void causal_conv1d_backward(const BackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.forward.x.scalar_type(),
                                  "causal_conv1d_backward_cpu", [&] { backward_typed<scalar_t>(args); });
}

void causal_conv1d_update(const UpdateArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "causal_conv1d_update_cpu",
                                  [&] { update_typed<scalar_t>(args); });
}

}  // namespace shammie::SHAMMIE_CPU_NAMESPACE

SHAMMIE_CPU_TARGET_END
