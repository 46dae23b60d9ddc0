// CPU kernels of selective_scan (math in selective_scan.h / ssm_math.h), compiled once per
// instruction set. Vector lanes run over kLanes channels of one (batch, group), not over the N
// states: each lane's state update needs no horizontal sum (y_t sums over n within a lane), and the
// (dt, u) of a time step become one vector load. Time runs in sub-chunks of kSubChunk steps whose
// inputs are transposed to [step][lane] first. Work items are (batch, group, block of kLanes
// channels), spread with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "selective_scan/selective_scan.h"
#include "selective_scan/ssm_math.h"

SHAMMIE_CPU_TARGET_BEGIN

namespace shammie::SHAMMIE_CPU_NAMESPACE {
namespace {

using ssm::kSubChunk;

// Where one work item's channels are: lanes c < count are channels d0 + c of batch b, group g.
struct Block {
  int64_t b, g, d0, count;
};

struct Layout {
  int64_t batch, dim, L, N, groups, per_group, blocks_per_group;
  template <int W>
  static Layout of(const ssm::ScanArgs& a) {
    const int64_t per_group = a.dim / a.groups;
    return {a.batch, a.dim, a.seqlen, a.dstate, a.groups, per_group, (per_group + W - 1) / W};
  }
  Block block(int64_t b, int64_t g, int64_t k, int W) const {
    const int64_t d0 = g * per_group + k * W;
    return {b, g, d0, std::min<int64_t>(W, (g + 1) * per_group - d0)};
  }
};

// dst[t][c] = src[c][t0 + t] for the block's rows (row length L); zeros in lanes past count.
template <int W, typename T, typename acc_t>
void gather(const T* src, const Block& blk, int64_t L, int64_t t0, int64_t steps, acc_t* dst) {
  const T* rows = src + t0;
  for (int64_t c = 0; c < W; ++c) {
    if (c < blk.count) {
      const T* row = rows + c * L;
      for (int64_t t = 0; t < steps; ++t) dst[t * W + c] = acc_t(row[t]);
    } else {
      for (int64_t t = 0; t < steps; ++t) dst[t * W + c] = acc_t(0);
    }
  }
}

template <int W, typename T, typename acc_t>
void scatter(const acc_t* src, const Block& blk, int64_t L, int64_t t0, int64_t steps, T* dst) {
  for (int64_t c = 0; c < blk.count; ++c) {
    T* row = dst + c * L + t0;
    for (int64_t t = 0; t < steps; ++t) row[t] = T(src[t * W + c]);
  }
}

// Per-item constants, transposed to [n][lane]: A, and B / C when they are constant.
template <int W, typename acc_t>
struct LaneParams {
  int64_t N;
  std::vector<acc_t> A, B, C, D, bias;
  LaneParams(const ssm::ScanArgs& a, const Block& blk) : N(a.dstate), A(N * W), B(N * W), C(N * W), D(W), bias(W) {
    const acc_t* A_ = a.A.const_data_ptr<acc_t>();
    const acc_t* D_ = a.D.const_data_ptr<acc_t>();
    const acc_t* bias_ = a.delta_bias.const_data_ptr<acc_t>();
    for (int64_t c = 0; c < W; ++c) {
      const bool on = c < blk.count;
      const int64_t d = blk.d0 + c;
      D[c] = on ? D_[d] : acc_t(0);
      bias[c] = on ? bias_[d] : acc_t(0);
      for (int64_t n = 0; n < N; ++n) {
        A[n * W + c] = on ? A_[d * N + n] : acc_t(0);
        B[n * W + c] = on && !a.B_variable ? a.B.const_data_ptr<acc_t>()[d * N + n] : acc_t(0);
        C[n * W + c] = on && !a.C_variable ? a.C.const_data_ptr<acc_t>()[d * N + n] : acc_t(0);
      }
    }
  }
};

// One sub-chunk's inputs as [step][lane]: raw step v = delta + bias, dt = softplus(v) or v, u.
template <int W, typename scalar_t, typename acc_t>
struct SubChunk {
  int64_t t0 = 0, steps = 0;
  acc_t v[kSubChunk * W], dt[kSubChunk * W], u[kSubChunk * W];
  const acc_t* B_rows = nullptr;   // variable B at step t0: [step][n]
  const acc_t* C_rows = nullptr;

  void load(const ssm::ScanArgs& a, const LaneParams<W, acc_t>& p, const Block& blk, int64_t t0_, int64_t steps_) {
    t0 = t0_;
    steps = steps_;
    const int64_t L = a.seqlen, row0 = (blk.b * a.dim + blk.d0) * L;
    gather<W>(a.delta.const_data_ptr<scalar_t>() + row0, blk, L, t0, steps, v);
    gather<W>(a.u.const_data_ptr<scalar_t>() + row0, blk, L, t0, steps, u);
    for (int64_t t = 0; t < steps; ++t) {
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) v[t * W + c] += p.bias[c];
    }
    if (a.softplus) {
#pragma omp simd
      for (int64_t i = 0; i < steps * W; ++i) dt[i] = ssm::softplus(v[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < steps * W; ++i) dt[i] = v[i];
    }
    const int64_t bc_row = ((blk.b * a.groups + blk.g) * L + t0) * a.dstate;
    if (a.B_variable) B_rows = a.B.const_data_ptr<acc_t>() + bc_row;
    if (a.C_variable) C_rows = a.C.const_data_ptr<acc_t>() + bc_row;
  }
};

// Advance the lanes' states h [n][lane] over the sub-chunk. y [step][lane] gets Σ_n C·h + D·u; with
// kRecord, hist [step + 1][n][lane] gets the state after each step (hist[0] = the start state).
template <int W, bool kBvar, bool kCvar, bool kRecord, typename scalar_t, typename acc_t>
void advance(const LaneParams<W, acc_t>& p, const SubChunk<W, scalar_t, acc_t>& s, acc_t* h, acc_t* y,
             std::type_identity_t<acc_t>* hist) {
  const int64_t N = p.N;
  if constexpr (kRecord) std::copy(h, h + N * W, hist);
  for (int64_t t = 0; t < s.steps; ++t) {
    acc_t* recorded = kRecord ? hist + (t + 1) * N * W : nullptr;
    const acc_t* dt = s.dt + t * W;
    const acc_t* u = s.u + t * W;
    acc_t dtu[W], yt[W];
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      dtu[c] = dt[c] * u[c];
      yt[c] = p.D[c] * u[c];
    }
    for (int64_t n = 0; n < N; ++n) {
      const acc_t* a_n = p.A.data() + n * W;
      const acc_t* b_n = p.B.data() + n * W;
      const acc_t* c_n = p.C.data() + n * W;
      const acc_t b_s = kBvar ? s.B_rows[t * N + n] : acc_t(0);
      const acc_t c_s = kCvar ? s.C_rows[t * N + n] : acc_t(0);
      acc_t* h_n = h + n * W;
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) {
        const acc_t hv = vexp(dt[c] * a_n[c]) * h_n[c] + dtu[c] * (kBvar ? b_s : b_n[c]);
        h_n[c] = hv;
        if constexpr (kRecord) recorded[n * W + c] = hv;
        yt[c] += hv * (kCvar ? c_s : c_n[c]);
      }
    }
    std::copy(yt, yt + W, y + t * W);
  }
}

// The block's state [n][lane] from / to checkpoint k of (batch, dim, n_cp, N).
template <int W, typename acc_t>
void load_state(const acc_t* cp, const Block& blk, int64_t dim, int64_t n_cp, int64_t N, int64_t k, acc_t* h) {
  std::fill(h, h + N * W, acc_t(0));
  for (int64_t c = 0; c < blk.count; ++c) {
    const acc_t* src = cp + ((blk.b * dim + blk.d0 + c) * n_cp + k) * N;
    for (int64_t n = 0; n < N; ++n) h[n * W + c] = src[n];
  }
}

template <int W, typename acc_t>
void add_state(const acc_t* cp, const Block& blk, int64_t dim, int64_t n_cp, int64_t N, int64_t k, acc_t* h) {
  for (int64_t c = 0; c < blk.count; ++c) {
    const acc_t* src = cp + ((blk.b * dim + blk.d0 + c) * n_cp + k) * N;
    for (int64_t n = 0; n < N; ++n) h[n * W + c] += src[n];
  }
}

template <int W, typename acc_t>
void store_state(const acc_t* h, const Block& blk, int64_t dim, int64_t n_cp, int64_t N, int64_t k, acc_t* cp) {
  for (int64_t c = 0; c < blk.count; ++c) {
    acc_t* dst = cp + ((blk.b * dim + blk.d0 + c) * n_cp + k) * N;
    for (int64_t n = 0; n < N; ++n) dst[n] = h[n * W + c];
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

template <int W, bool kBvar, bool kCvar, typename scalar_t, typename acc_t>
void forward_block(const ssm::ScanForwardArgs& args, const Block& blk) {
  const ssm::ScanArgs& a = args.in;
  const int64_t L = a.seqlen, N = a.dstate, interval = ssm::checkpoint_interval(N);
  const int64_t n_cp = a.checkpoints.size(2), row0 = (blk.b * a.dim + blk.d0) * L;
  LaneParams<W, acc_t> p(a, blk);
  std::vector<acc_t> h(N * W, acc_t(0));
  SubChunk<W, scalar_t, acc_t> s;
  acc_t y[kSubChunk * W], z[kSubChunk * W];
  for (int64_t t0 = 0; t0 < L; t0 += kSubChunk) {
    const int64_t steps = std::min(kSubChunk, L - t0);
    s.load(a, p, blk, t0, steps);
    advance<W, kBvar, kCvar, false>(p, s, h.data(), y, nullptr);
    if (a.z) {
      gather<W>(a.z->const_data_ptr<scalar_t>() + row0, blk, L, t0, steps, z);
#pragma omp simd
      for (int64_t i = 0; i < steps * W; ++i) y[i] = ssm::gate(y[i], z[i]);
    }
    scatter<W>(y, blk, L, t0, steps, args.out.mutable_data_ptr<scalar_t>() + row0);
    const int64_t t_end = t0 + steps;
    if (t_end % interval == 0 || t_end == L)
      store_state<W>(h.data(), blk, a.dim, n_cp, N, (t_end - 1) / interval, a.checkpoints.mutable_data_ptr<acc_t>());
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// Per-item gradient accumulators, [n][lane] or [lane]; written out once at the end.
template <int W, typename acc_t>
struct LaneGrads {
  std::vector<acc_t> G, dA, dB, dC, dD, dbias;
  explicit LaneGrads(int64_t N) : G(N * W), dA(N * W), dB(N * W), dC(N * W), dD(W), dbias(W) {}
};

template <typename acc_t>
acc_t sigmoid(acc_t x) { return acc_t(1) / (acc_t(1) + vexp(-x)); }

// A step's per-lane dB (or dC) contributions: summed over the lanes into the item's [step][n] row
// when B varies with time (all lanes share B_t), kept per lane when B is constant (B[d] per channel).
template <int W, bool kVariable, typename acc_t>
void accumulate_bc(const acc_t* part, acc_t* per_lane, acc_t* row) {
  if constexpr (kVariable) {
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < W; ++c) sum += part[c];
    *row += sum;
  } else {
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) per_lane[c] += part[c];
  }
}

// The reverse sweep over one sub-chunk whose start state is hist[0] and states hist[1..steps].
// dBC_rows: variable dB / dC accumulators [step][n] of this item's slab (nullptr when constant).
template <int W, bool kBvar, bool kCvar, typename scalar_t, typename acc_t>
void backward_sub_chunk(const ssm::ScanBackwardArgs& args, const Block& blk, const LaneParams<W, acc_t>& p,
                        const SubChunk<W, scalar_t, acc_t>& s, const acc_t* hist, const acc_t* y,
                        LaneGrads<W, acc_t>& gr, acc_t* dB_rows, acc_t* dC_rows) {
  const ssm::ScanArgs& a = args.in;
  const int64_t L = a.seqlen, N = a.dstate, steps = s.steps, row0 = (blk.b * a.dim + blk.d0) * L;
  acc_t dout[kSubChunk * W], z[kSubChunk * W], du[kSubChunk * W], ddelta[kSubChunk * W], dz[kSubChunk * W];
  gather<W>(args.grad_out.const_data_ptr<scalar_t>() + row0, blk, L, s.t0, steps, dout);
  if (a.z) {
    gather<W>(a.z->const_data_ptr<scalar_t>() + row0, blk, L, s.t0, steps, z);
#pragma omp simd
    for (int64_t i = 0; i < steps * W; ++i) {
      const acc_t sg = sigmoid(z[i]);
      dz[i] = dout[i] * y[i] * sg * (acc_t(1) + z[i] * (acc_t(1) - sg));
      dout[i] *= z[i] * sg;   // now dy
    }
  }
  for (int64_t t = steps - 1; t >= 0; --t) {
    const acc_t* dt = s.dt + t * W;
    const acc_t* u = s.u + t * W;
    const acc_t* dy = dout + t * W;
    const acc_t* h_prev = hist + t * N * W;
    const acc_t* h_now = hist + (t + 1) * N * W;
    acc_t ddt[W], du_t[W], dtu[W];
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      dtu[c] = dt[c] * u[c];
      du_t[c] = dy[c] * p.D[c];
      gr.dD[c] += dy[c] * u[c];
      ddt[c] = acc_t(0);
    }
    for (int64_t n = 0; n < N; ++n) {
      const acc_t* a_n = p.A.data() + n * W;
      const acc_t b_s = kBvar ? s.B_rows[t * N + n] : acc_t(0);
      const acc_t c_s = kCvar ? s.C_rows[t * N + n] : acc_t(0);
      const acc_t* b_n = p.B.data() + n * W;
      const acc_t* c_n = p.C.data() + n * W;
      acc_t* G = gr.G.data() + n * W;
      acc_t* dA = gr.dA.data() + n * W;
      acc_t* dBc = gr.dB.data() + n * W;
      acc_t* dCc = gr.dC.data() + n * W;
      acc_t part_B[W], part_C[W];
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) {
        const acc_t bv = kBvar ? b_s : b_n[c];
        const acc_t g = G[c] + (kCvar ? c_s : c_n[c]) * dy[c];   // dL/dh_t
        const acc_t decay = vexp(dt[c] * a_n[c]);
        const acc_t carried = g * h_prev[n * W + c] * decay;      // dL/d(dt·A) through the decay
        dA[c] += carried * dt[c];
        ddt[c] += carried * a_n[c] + g * bv * u[c];
        du_t[c] += g * dt[c] * bv;
        part_B[c] = g * dtu[c];
        part_C[c] = dy[c] * h_now[n * W + c];
        G[c] = decay * g;
      }
      const int64_t row = (s.t0 + t) * N + n;
      accumulate_bc<W, kBvar>(part_B, dBc, kBvar ? dB_rows + row : nullptr);
      accumulate_bc<W, kCvar>(part_C, dCc, kCvar ? dC_rows + row : nullptr);
    }
    const acc_t* v = s.v + t * W;
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      const acc_t dd = a.softplus ? ddt[c] * (v[c] > acc_t(20) ? acc_t(1) : sigmoid(v[c])) : ddt[c];
      ddelta[t * W + c] = dd;
      gr.dbias[c] += dd;
      du[t * W + c] = du_t[c];
    }
  }
  scatter<W>(du, blk, L, s.t0, steps, args.du.mutable_data_ptr<scalar_t>() + row0);
  scatter<W>(ddelta, blk, L, s.t0, steps, args.ddelta.mutable_data_ptr<scalar_t>() + row0);
  if (a.z) scatter<W>(dz, blk, L, s.t0, steps, args.dz->mutable_data_ptr<scalar_t>() + row0);
}

// Per-channel gradients (dA, constant dB / dC, dD, ddelta_bias) are sums over the batch, and the
// batches of one channel run on different threads: each batch gets its own slice, summed afterwards.
template <typename acc_t>
struct ChannelGrads {
  at::Tensor A, B, C, D, bias;   // (batch, dim, N) x3, (batch, dim) x2

  ChannelGrads(const ssm::ScanArgs& a, int64_t batch) {
    const auto opts = a.A.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    A = at::zeros({batch, a.dim, a.dstate}, opts);
    B = a.B_variable ? at::Tensor() : at::zeros({batch, a.dim, a.dstate}, opts);
    C = a.C_variable ? at::Tensor() : at::zeros({batch, a.dim, a.dstate}, opts);
    D = at::zeros({batch, a.dim}, opts);
    bias = at::zeros({batch, a.dim}, opts);
  }
  static acc_t* slice(at::Tensor& t, int64_t b) { return t.defined() ? t.mutable_data_ptr<acc_t>() + b * (t.numel() / t.size(0)) : nullptr; }
  void write_sums(const ssm::ScanBackwardArgs& args) {
    args.dA.add_(A.sum(0));
    if (B.defined()) args.dB.add_(B.sum(0));
    if (C.defined()) args.dC.add_(C.sum(0));
    args.dD.add_(D.sum(0));
    args.ddelta_bias.add_(bias.sum(0));
  }
};

template <int W, bool kBvar, bool kCvar, typename scalar_t, typename acc_t>
void backward_block(const ssm::ScanBackwardArgs& args, const Block& blk, ChannelGrads<acc_t>& out, acc_t* dB_rows,
                    acc_t* dC_rows) {
  const ssm::ScanArgs& a = args.in;
  const int64_t L = a.seqlen, N = a.dstate, interval = ssm::checkpoint_interval(N), n_cp = a.checkpoints.size(2);
  const int64_t subs_per_interval = interval / kSubChunk;
  LaneParams<W, acc_t> p(a, blk);
  LaneGrads<W, acc_t> gr(N);
  SubChunk<W, scalar_t, acc_t> s;
  std::vector<acc_t> start(N * W), sub_starts(subs_per_interval * N * W), hist((kSubChunk + 1) * N * W);
  acc_t y[kSubChunk * W];
  const acc_t* cp = a.checkpoints.const_data_ptr<acc_t>();
  for (int64_t k = n_cp - 1; k >= 0; --k) {
    if (args.grad_checkpoints) add_state<W>(args.grad_checkpoints->const_data_ptr<acc_t>(), blk, a.dim, n_cp, N, k, gr.G.data());
    // States at the start of each sub-chunk of this interval, from the previous checkpoint.
    if (k > 0) load_state<W>(cp, blk, a.dim, n_cp, N, k - 1, start.data());
    else std::fill(start.begin(), start.end(), acc_t(0));
    const int64_t t_begin = k * interval, t_end = std::min(L, t_begin + interval);
    const int64_t subs = (t_end - t_begin + kSubChunk - 1) / kSubChunk;
    std::copy(start.begin(), start.end(), sub_starts.begin());
    for (int64_t j = 0; j + 1 < subs; ++j) {
      s.load(a, p, blk, t_begin + j * kSubChunk, kSubChunk);
      std::copy(sub_starts.begin() + j * N * W, sub_starts.begin() + (j + 1) * N * W, start.begin());
      advance<W, kBvar, kCvar, false>(p, s, start.data(), y, nullptr);
      std::copy(start.begin(), start.end(), sub_starts.begin() + (j + 1) * N * W);
    }
    for (int64_t j = subs - 1; j >= 0; --j) {
      const int64_t t0 = t_begin + j * kSubChunk;
      s.load(a, p, blk, t0, std::min(kSubChunk, t_end - t0));
      std::copy(sub_starts.begin() + j * N * W, sub_starts.begin() + (j + 1) * N * W, start.begin());
      advance<W, kBvar, kCvar, true>(p, s, start.data(), y, hist.data());
      backward_sub_chunk<W, kBvar, kCvar>(args, blk, p, s, hist.data(), y, gr, dB_rows, dC_rows);
    }
  }
  // This batch's slice of the per-channel gradients: each (batch, channel) belongs to one item.
  acc_t* dA = ChannelGrads<acc_t>::slice(out.A, blk.b);
  acc_t* dB = ChannelGrads<acc_t>::slice(out.B, blk.b);
  acc_t* dC = ChannelGrads<acc_t>::slice(out.C, blk.b);
  acc_t* dD = ChannelGrads<acc_t>::slice(out.D, blk.b);
  acc_t* dbias = ChannelGrads<acc_t>::slice(out.bias, blk.b);
  for (int64_t c = 0; c < blk.count; ++c) {
    const int64_t d = blk.d0 + c;
    dD[d] += gr.dD[c];
    dbias[d] += gr.dbias[c];
    for (int64_t n = 0; n < N; ++n) {
      dA[d * N + n] += gr.dA[n * W + c];
      if (!kBvar) dB[d * N + n] += gr.dB[n * W + c];
      if (!kCvar) dC[d * N + n] += gr.dC[n * W + c];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch over dtype and the B / C forms; the item loops.

template <typename Fn>
void with_bc_forms(bool B_variable, bool C_variable, Fn&& fn) {
  if (B_variable && C_variable) fn(std::true_type{}, std::true_type{});
  else if (B_variable) fn(std::true_type{}, std::false_type{});
  else if (C_variable) fn(std::false_type{}, std::true_type{});
  else fn(std::false_type{}, std::false_type{});
}

template <typename acc_t>
constexpr int lanes() { return 64 / sizeof(acc_t); }   // one AVX-512 register

template <typename scalar_t>
void forward_typed(const ssm::ScanForwardArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = lanes<acc_t>();
  const Layout lay = Layout::of<W>(args.in);
  with_bc_forms(args.in.B_variable, args.in.C_variable, [&](auto Bv, auto Cv) {
    const int64_t items = lay.batch * lay.groups * lay.blocks_per_group;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (lay.groups * lay.blocks_per_group), rest = i % (lay.groups * lay.blocks_per_group);
        forward_block<W, decltype(Bv)::value, decltype(Cv)::value, scalar_t, acc_t>(
            args, lay.block(b, rest / lay.blocks_per_group, rest % lay.blocks_per_group, W));
      }
    });
  });
}

// Variable dB / dC sum over the channels of a group. Each item is a slab of consecutive channel
// blocks with its own [L][N] accumulator, summed in a fixed order afterwards: deterministic for a
// given thread count, and no (batch, dim, L, N) buffer.
template <typename scalar_t>
void backward_typed(const ssm::ScanBackwardArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = lanes<acc_t>();
  const ssm::ScanArgs& a = args.in;
  const Layout lay = Layout::of<W>(a);
  const bool any_variable = a.B_variable || a.C_variable;
  const int64_t threads = at::get_num_threads();
  const int64_t slabs = any_variable
      ? std::min(lay.blocks_per_group, std::max<int64_t>(1, (2 * threads + lay.batch * lay.groups - 1) / (lay.batch * lay.groups)))
      : lay.blocks_per_group;
  const int64_t blocks_per_slab = (lay.blocks_per_group + slabs - 1) / slabs;
  const int64_t rows = lay.L * lay.N;
  // (batch, groups, slabs, L, N) partial sums for each variable one.
  at::Tensor part_B = a.B_variable ? at::zeros({lay.batch, lay.groups, slabs, lay.L, lay.N}, a.A.options()) : at::Tensor();
  at::Tensor part_C = a.C_variable ? at::zeros({lay.batch, lay.groups, slabs, lay.L, lay.N}, a.A.options()) : at::Tensor();
  ChannelGrads<acc_t> channel_grads(a, lay.batch);
  with_bc_forms(a.B_variable, a.C_variable, [&](auto Bv, auto Cv) {
    const int64_t items = lay.batch * lay.groups * slabs;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (lay.groups * slabs), g = (i / slabs) % lay.groups, slab = i % slabs;
        acc_t* dB_rows = a.B_variable ? part_B.mutable_data_ptr<acc_t>() + i * rows : nullptr;
        acc_t* dC_rows = a.C_variable ? part_C.mutable_data_ptr<acc_t>() + i * rows : nullptr;
        const int64_t k_end = std::min(lay.blocks_per_group, (slab + 1) * blocks_per_slab);
        for (int64_t k = slab * blocks_per_slab; k < k_end; ++k)
          backward_block<W, decltype(Bv)::value, decltype(Cv)::value, scalar_t, acc_t>(
              args, lay.block(b, g, k, W), channel_grads, dB_rows, dC_rows);
      }
    });
  });
  channel_grads.write_sums(args);
  if (a.B_variable) args.dB.copy_(part_B.sum(2));
  if (a.C_variable) args.dC.copy_(part_C.sum(2));
}

}  // namespace

void selective_scan_forward(const ssm::ScanForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.in.u.scalar_type(), "selective_scan_cpu",
                                  [&] { forward_typed<scalar_t>(args); });
}

void selective_scan_backward(const ssm::ScanBackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.in.u.scalar_type(), "selective_scan_backward_cpu",
                                  [&] { backward_typed<scalar_t>(args); });
}

}  // namespace shammie::SHAMMIE_CPU_NAMESPACE

SHAMMIE_CPU_TARGET_END
