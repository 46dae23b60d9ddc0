// CPU kernels of ssd_scan (math in ssd_scan.h), compiled once per instruction set.
//
// Every row p of a head is its own recurrence over the N-vector S[p,:] with the head's scalar decay,
// so the inner loops run over n, contiguous in B, C and the state: they vectorize, and the decay
// exp(dt·A) is computed once per (head, step) rather than once per state. Time is blocked in
// checkpoint intervals; within one, each row runs all its steps before the next row starts, so the
// interval's B and C rows stay in cache across the head's P rows.
//
// Forward work items are (batch, head). The backward's dB and dC sum over the heads of a group, so
// its work items are (batch, group, slice of the group's heads), each slice summing into its own
// copy of dB and dC (no races); the copies are added at the end, in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "common/cpu_isa.h"
#include "selective_scan/ssm_math.h"
#include "ssd/ssd_scan.h"

SHAMMIE_CPU_TARGET_BEGIN

namespace shammie::SHAMMIE_CPU_NAMESPACE {
namespace {

using ssd::kInterval;
constexpr int64_t kBackwardItems = 16;
constexpr int64_t kSliceBytes = int64_t(256) << 20;

// The arguments as pointers and sizes (the index maps are ssd::Layout's).
template <typename scalar_t, typename acc_t>
struct View : ssd::Layout, ssd::SsdInputs<scalar_t, acc_t> {
  bool softplus;

  static View of(const ssd::SsdArgs& a) {
    return {ssd::layout_of(a), ssd::SsdInputs<scalar_t, acc_t>::of(a), a.softplus};
  }
};

// Per step of (b, h): dt_t, the decay a_t = exp(dt_t·A_h), and (when asked) d dt_t / d raw dt.
template <typename scalar_t, typename acc_t>
void step_sizes(const View<scalar_t, acc_t>& v, int64_t b, int64_t h, acc_t* dts, acc_t* decay, acc_t* slope) {
  for (int64_t t = 0; t < v.L; ++t) {
    const acc_t raw = acc_t(v.dt[v.dt_at(b, t, h)]) + v.dt_bias[h];
    dts[t] = ssm::step_size(raw, acc_t(0), v.softplus);
    decay[t] = ssd::starts_sequence(v.seq_idx, v.L, b, t) ? acc_t(0) : vexp(dts[t] * v.A[h]);
    if (slope) slope[t] = v.softplus && raw <= acc_t(20) ? acc_t(1) / (acc_t(1) + vexp(-raw)) : acc_t(1);
  }
}

// ---------------------------------------------------------------------------------------------

// One vector register's worth of acc_t.
template <typename acc_t>
constexpr int64_t kLanesOf = 64 / sizeof(acc_t);

// Σ_j part[j] as a tree (depth log2 of the width), not a chain of kLanes dependent adds.
template <typename acc_t, int64_t W>
acc_t lane_sum(acc_t (&part)[W]) {
#pragma GCC unroll 8
  for (int64_t w = W / 2; w > 0; w /= 2)
#pragma GCC unroll 16
    for (int64_t j = 0; j < w; ++j) part[j] += part[j + w];
  return part[0];
}

// kRows rows advance together: they share each step's B and C loads, and their kRows sums over n
// are independent chains, which hides the latency of the multiply-adds.
constexpr int64_t kRows = 4;

// Rows p0 .. p0+R−1 of (b, h) through steps t0 .. t1−1; their states are S + p·N. At the last step
// of a packed sequence the rows' states are also copied to its varlen state.
template <int64_t R, typename scalar_t, typename acc_t>
void forward_rows(const View<scalar_t, acc_t>& v, int64_t b, int64_t h, int64_t p0, int64_t t0, int64_t t1,
                  const acc_t* dts, const acc_t* decay, acc_t* S, scalar_t* out, acc_t* varlen) {
  constexpr int64_t kLanes = kLanesOf<acc_t>;
  const int64_t N = v.N;
  acc_t* s[R];
  for (int64_t r = 0; r < R; ++r) s[r] = S + (p0 + r) * N;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t at = v.x_at(b, t, h) + p0;
    const acc_t* Bt = v.B + v.bc_at(b, t, h);
    const acc_t* Ct = v.C + v.bc_at(b, t, h);
    const acc_t a = decay[t];
    acc_t xv[R], coef[R], y[R];
    for (int64_t r = 0; r < R; ++r) {
      xv[r] = acc_t(v.x[at + r]);
      coef[r] = dts[t] * xv[r];
      y[r] = 0;
    }
    if (N % kLanes == 0) {   // sums over n kept as kLanes partial sums per row, added as a tree
      acc_t part[R][kLanes] = {};
      for (int64_t n0 = 0; n0 < N; n0 += kLanes) {
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          const acc_t bn = Bt[n0 + j], cn = Ct[n0 + j];
          for (int64_t r = 0; r < R; ++r) {
            const acc_t sn = a * s[r][n0 + j] + coef[r] * bn;
            s[r][n0 + j] = sn;
            part[r][j] += sn * cn;
          }
        }
      }
      for (int64_t r = 0; r < R; ++r) y[r] = lane_sum(part[r]);
    } else {
      for (int64_t r = 0; r < R; ++r) {
        acc_t yr = 0;
#pragma omp simd reduction(+ : yr)
        for (int64_t n = 0; n < N; ++n) {
          const acc_t sn = a * s[r][n] + coef[r] * Bt[n];
          s[r][n] = sn;
          yr += sn * Ct[n];
        }
        y[r] = yr;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      acc_t yr = y[r] + v.D[h * v.P + p0 + r] * xv[r];
      if (v.z) yr = ssm::gate(yr, acc_t(v.z[at + r]));
      out[at + r] = scalar_t(yr);
    }
    const int64_t slot = v.state_slot ? v.state_slot[b * v.L + t] : -1;
    if (slot >= 0) {
      for (int64_t r = 0; r < R; ++r) std::copy_n(s[r], N, varlen + v.varlen_at(slot, h) + (p0 + r) * N);
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_head(const View<scalar_t, acc_t>& v, int64_t b, int64_t h, acc_t* work, scalar_t* out,
                  acc_t* checkpoints, acc_t* final_state, acc_t* varlen) {
  const int64_t L = v.L, P = v.P, N = v.N;
  acc_t* dts = work;
  acc_t* decay = dts + L;
  acc_t* S = decay + L;                                   // (P, N)
  step_sizes(v, b, h, dts, decay, static_cast<acc_t*>(nullptr));
  if (v.initial_states) std::copy_n(v.initial_states + v.state_at(b, h), P * N, S);
  else std::fill_n(S, P * N, acc_t(0));
  for (int64_t k = 0; k < v.n_cp; ++k) {
    const int64_t t0 = k * kInterval, t1 = std::min(L, t0 + kInterval);
    std::copy_n(S, P * N, checkpoints + v.checkpoint_at(b, h, k));
    int64_t p = 0;
    for (; p + kRows <= P; p += kRows) forward_rows<kRows>(v, b, h, p, t0, t1, dts, decay, S, out, varlen);
    for (; p < P; ++p) forward_rows<1>(v, b, h, p, t0, t1, dts, decay, S, out, varlen);
  }
  std::copy_n(S, P * N, final_state + v.state_at(b, h));
}

template <typename scalar_t, typename acc_t>
void forward(const ssd::SsdForwardArgs& a) {
  const auto v = View<scalar_t, acc_t>::of(a.in);
  scalar_t* out = a.out.data_ptr<scalar_t>();
  acc_t* checkpoints = a.in.checkpoints.data_ptr<acc_t>();
  acc_t* final_state = a.final_state.data_ptr<acc_t>();
  acc_t* varlen = a.varlen_states.data_ptr<acc_t>();
  at::parallel_for(0, a.in.batch * v.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> work(2 * v.L + v.P * v.N);
    for (int64_t i = begin; i < end; ++i) {
      forward_head(v, i / v.H, i % v.H, work.data(), out, checkpoints, final_state, varlen);
    }
  });
}

// ---------------------------------------------------------------------------------------------

// Where one backward work item writes: its own copy of dB / dC, and per-(batch, head) partial sums.
template <typename scalar_t, typename acc_t>
struct BackwardOut {
  const scalar_t* grad_out;
  const acc_t* grad_final;
  const acc_t* grad_varlen;   // (num_seqs, H, P, N), or null
  const acc_t* checkpoints;
  scalar_t* dx;
  scalar_t* ddt;
  scalar_t* dz;
  acc_t* dinitial;
  acc_t* dB;           // (slices, batch, L, G, N)
  acc_t* dC;
  int64_t slice_size;  // batch·L·G·N
  acc_t* dA;           // (batch, H)
  acc_t* dD;           // (batch, H·P)
  acc_t* dbias;        // (batch, H)
};

// Per-(batch, head) state of the backward sweep.
template <typename acc_t>
struct HeadSweep {
  const acc_t* dts;
  const acc_t* decay;
  acc_t* ddt;      // gradient w.r.t. dt_t (after softplus), summed over rows
  acc_t* G;        // (P, N): gradient w.r.t. the state, carried back in time
  acc_t* S;        // (kRows, kInterval + 1, N): the rows' states in one interval
  acc_t* dB;       // this work item's copy of dB / dC
  acc_t* dC;
  double dA;       // long sums of scalars (over L·P steps) accumulate in double
};

// Σ_n u[n]·w[n], for the z gate's y.
template <typename acc_t>
acc_t dot(const acc_t* u, const acc_t* w, int64_t N) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t n = 0; n < N; ++n) sum += u[n] * w[n];
  return sum;
}

// Rows p0 .. p0+R−1 of (b, h) back through interval k. Like the forward, the rows share each step's
// loads (and here the read-modify-writes of dB_t and dC_t), and keep their sums over n as lanes.
template <int64_t R, typename scalar_t, typename acc_t>
void backward_rows(const View<scalar_t, acc_t>& v, const BackwardOut<scalar_t, acc_t>& o, int64_t b, int64_t h,
                   int64_t p0, int64_t k, HeadSweep<acc_t>& w) {
  constexpr int64_t kLanes = kLanesOf<acc_t>;
  const int64_t N = v.N, P = v.P, t0 = k * kInterval, t1 = std::min(v.L, t0 + kInterval);
  const int64_t row_states = (kInterval + 1) * N;
  // Each row's states S_{t0−1} .. S_{t1−1}, recomputed from the checkpoint.
  for (int64_t r = 0; r < R; ++r) {
    acc_t* S = w.S + r * row_states;
    std::copy_n(o.checkpoints + v.checkpoint_at(b, h, k) + (p0 + r) * N, N, S);
    for (int64_t t = t0; t < t1; ++t) {
      const acc_t coef = w.dts[t] * acc_t(v.x[v.x_at(b, t, h) + p0 + r]), a = w.decay[t];
      const acc_t* Bt = v.B + v.bc_at(b, t, h);
      const acc_t* prev = S + (t - t0) * N;
      acc_t* cur = S + (t - t0 + 1) * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) cur[n] = a * prev[n] + coef * Bt[n];
    }
  }
  acc_t* g[R];
  double dD[R] = {};
  for (int64_t r = 0; r < R; ++r) g[r] = w.G + (p0 + r) * N;
  const acc_t A = v.A[h];
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const int64_t at = v.x_at(b, t, h) + p0, bc = v.bc_at(b, t, h);
    const acc_t *Bt = v.B + bc, *Ct = v.C + bc;
    acc_t *dBt = w.dB + bc, *dCt = w.dC + bc;
    const acc_t* cur[R];
    const acc_t* prev[R];
    acc_t xv[R], dy[R], coef[R], dcoef[R], da[R];
    const acc_t a = w.decay[t];
    const int64_t slot = o.grad_varlen && v.state_slot ? v.state_slot[b * v.L + t] : -1;
    for (int64_t r = 0; r < R; ++r) {
      if (slot >= 0) {   // S_t is also a packed sequence's varlen state: its gradient enters here
        const acc_t* gv = o.grad_varlen + v.varlen_at(slot, h) + (p0 + r) * N;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) g[r][n] += gv[n];
      }
      cur[r] = w.S + r * row_states + (t - t0 + 1) * N;
      prev[r] = cur[r] - N;
      xv[r] = acc_t(v.x[at + r]);
      coef[r] = w.dts[t] * xv[r];
      const acc_t go = acc_t(o.grad_out[at + r]);
      dy[r] = go;
      if (v.z) {   // out = y·silu(z): dy = go·silu(z), dz = go·y·silu'(z)
        const acc_t y = v.D[h * P + p0 + r] * xv[r] + dot(cur[r], Ct, N);
        const acc_t zv = acc_t(v.z[at + r]), sig = acc_t(1) / (acc_t(1) + vexp(-zv));
        o.dz[at + r] = scalar_t(go * y * sig * (acc_t(1) + zv * (acc_t(1) - sig)));
        dy[r] = go * zv * sig;
      }
    }
    if (N % kLanes == 0) {
      acc_t part_coef[R][kLanes] = {}, part_a[R][kLanes] = {};
      for (int64_t n0 = 0; n0 < N; n0 += kLanes) {
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          const int64_t n = n0 + j;
          const acc_t bn = Bt[n], cn = Ct[n];
          acc_t db = dBt[n], dc = dCt[n];
          for (int64_t r = 0; r < R; ++r) {
            const acc_t gn = g[r][n] + dy[r] * cn;   // d loss / d S_t
            dc += dy[r] * cur[r][n];
            db += coef[r] * gn;
            part_coef[r][j] += gn * bn;
            part_a[r][j] += gn * prev[r][n];
            g[r][n] = a * gn;                         // d loss / d S_{t−1} through the recurrence
          }
          dBt[n] = db, dCt[n] = dc;
        }
      }
      for (int64_t r = 0; r < R; ++r) dcoef[r] = lane_sum(part_coef[r]), da[r] = lane_sum(part_a[r]);
    } else {
      for (int64_t r = 0; r < R; ++r) {
        acc_t sum_coef = 0, sum_a = 0;
#pragma omp simd reduction(+ : sum_coef, sum_a)
        for (int64_t n = 0; n < N; ++n) {
          const acc_t gn = g[r][n] + dy[r] * Ct[n];
          dCt[n] += dy[r] * cur[r][n];
          dBt[n] += coef[r] * gn;
          sum_coef += gn * Bt[n];
          sum_a += gn * prev[r][n];
          g[r][n] = a * gn;
        }
        dcoef[r] = sum_coef, da[r] = sum_a;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      o.dx[at + r] = scalar_t(dy[r] * v.D[h * P + p0 + r] + w.dts[t] * dcoef[r]);
      dD[r] += dy[r] * xv[r];
      w.ddt[t] += xv[r] * dcoef[r] + da[r] * a * A;
      w.dA += da[r] * a * w.dts[t];
    }
  }
  for (int64_t r = 0; r < R; ++r) o.dD[(b * v.H + h) * P + p0 + r] += acc_t(dD[r]);
}

template <typename scalar_t, typename acc_t>
void backward_head(const View<scalar_t, acc_t>& v, const BackwardOut<scalar_t, acc_t>& o, int64_t b, int64_t h,
                   int64_t slice, acc_t* work) {
  const int64_t L = v.L, P = v.P, N = v.N;
  acc_t* dts = work;
  acc_t* decay = dts + L;
  acc_t* slope = decay + L;
  HeadSweep<acc_t> w{dts, decay, slope + L, slope + 2 * L, slope + 2 * L + P * N,
                     o.dB + slice * o.slice_size, o.dC + slice * o.slice_size, 0.0};
  step_sizes(v, b, h, dts, decay, slope);
  std::fill_n(w.ddt, L, acc_t(0));
  if (o.grad_final) std::copy_n(o.grad_final + v.state_at(b, h), P * N, w.G);
  else std::fill_n(w.G, P * N, acc_t(0));
  for (int64_t k = v.n_cp - 1; k >= 0; --k) {
    int64_t p = 0;
    for (; p + kRows <= P; p += kRows) backward_rows<kRows>(v, o, b, h, p, k, w);
    for (; p < P; ++p) backward_rows<1>(v, o, b, h, p, k, w);
  }
  double dbias = 0;
  for (int64_t t = 0; t < L; ++t) {   // through softplus to the raw dt (and its bias)
    const acc_t raw_grad = w.ddt[t] * slope[t];
    o.ddt[v.dt_at(b, t, h)] = scalar_t(raw_grad);
    dbias += raw_grad;
  }
  o.dbias[b * v.H + h] = acc_t(dbias);
  o.dA[b * v.H + h] = acc_t(w.dA);
  if (o.dinitial) std::copy_n(w.G, P * N, o.dinitial + v.state_at(b, h));
}

template <typename scalar_t, typename acc_t>
void backward(const ssd::SsdBackwardArgs& a) {
  const auto v = View<scalar_t, acc_t>::of(a.in);
  const int64_t batch = a.in.batch, per_group = v.heads_per_group;
  // About kBackwardItems work items, whatever the thread count, so that the sums over slices (and so
  // the gradients) come out the same on any machine; but no more than kSliceBytes of dB / dC copies
  // (a long sequence at batch 1 would otherwise take gigabytes).
  const int64_t copy_bytes = 2 * batch * v.L * v.G * v.N * static_cast<int64_t>(sizeof(acc_t));
  const int64_t max_slices = std::max<int64_t>(1, kSliceBytes / std::max<int64_t>(copy_bytes, 1));
  const int64_t slices = std::clamp<int64_t>((kBackwardItems + batch * v.G - 1) / (batch * v.G), 1,
                                             std::min(per_group, max_slices));
  const int64_t heads_per_slice = (per_group + slices - 1) / slices;
  const auto acc_opts = a.in.A.options();
  at::Tensor dB = slices == 1 ? a.dB : at::zeros({slices, batch, v.L, v.G, v.N}, acc_opts);
  at::Tensor dC = slices == 1 ? a.dC : at::zeros({slices, batch, v.L, v.G, v.N}, acc_opts);
  at::Tensor dA = at::zeros({batch, v.H}, acc_opts), dbias = at::zeros({batch, v.H}, acc_opts);
  at::Tensor dD = at::zeros({batch, v.H * v.P}, acc_opts);
  const BackwardOut<scalar_t, acc_t> o{
      a.grad_out.data_ptr<scalar_t>(), a.grad_final ? a.grad_final->data_ptr<acc_t>() : nullptr,
      a.grad_varlen ? a.grad_varlen->data_ptr<acc_t>() : nullptr, a.in.checkpoints.data_ptr<acc_t>(),
      a.dx.data_ptr<scalar_t>(), a.ddt.data_ptr<scalar_t>(),
      a.dz ? a.dz->data_ptr<scalar_t>() : nullptr, a.dinitial_states ? a.dinitial_states->data_ptr<acc_t>() : nullptr,
      dB.data_ptr<acc_t>(), dC.data_ptr<acc_t>(), batch * v.L * v.G * v.N, dA.data_ptr<acc_t>(),
      dD.data_ptr<acc_t>(), dbias.data_ptr<acc_t>()};
  at::parallel_for(0, batch * v.G * slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> work(4 * v.L + v.P * v.N + kRows * (kInterval + 1) * v.N);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (v.G * slices), g = i / slices % v.G, slice = i % slices;
      const int64_t first = g * per_group + slice * heads_per_slice;
      const int64_t last = std::min(first + heads_per_slice, (g + 1) * per_group);
      for (int64_t h = first; h < last; ++h) backward_head(v, o, b, h, slice, work.data());
    }
  });
  if (slices > 1) {
    a.dB.copy_(dB.sum(0));
    a.dC.copy_(dC.sum(0));
  }
  a.dA.copy_(dA.sum(0));
  a.dD.copy_(dD.sum(0));
  a.ddt_bias.copy_(dbias.sum(0));
}

}  // namespace

void ssd_scan_forward(const ssd::SsdForwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.in.x.scalar_type(), "ssd_scan_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward<scalar_t, acc_t>(a);
  });
}

void ssd_scan_backward(const ssd::SsdBackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.in.x.scalar_type(), "ssd_scan_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward<scalar_t, acc_t>(a);
  });
}

}  // namespace shammie::SHAMMIE_CPU_NAMESPACE

SHAMMIE_CPU_TARGET_END
