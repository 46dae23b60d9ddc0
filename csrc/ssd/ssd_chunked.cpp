// ssd_scan as chunked matrix products (Mamba-2's "state space duality"), for any device: the same math
// as the recurrence kernels (ssd_scan.h), regrouped so that almost all of the work is batched GEMMs
// (cuBLAS tensor cores on a GPU, MKL on a CPU) instead of a sequential sweep per state.
//
// Per (batch, head) and chunk of Q steps t0 .. t0+Q−1, with ℓ_t = dt_t·A_h and Λ_t = ℓ_t0 + .. + ℓ_t:
//   E[t,s]  = exp(Λ_t − Λ_s) = exp(ℓ_{s+1} + … + ℓ_t) for s ≤ t in the same packed sequence, else 0
//             (the decay from step s to step t)
//   M[t,s]  = E[t,s]·(C_t·B_s)·dt_s                        (the chunk's own inputs)
//   e_in[t] = exp(Λ_t), or 0 once a sequence has started   (the decay of the chunk's start state)
//   w_s     = exp(Λ_last − Λ_s)·dt_s, or 0 for steps before the last sequence's start
//   y  = M·X + diag(e_in)·C·S_inᵀ + D·x,     S_out = e_in[last]·S_in + Xᵀ·diag(w)·B.
// Only the pass of S_in from chunk to chunk is sequential (one fused multiply-add per chunk). At a
// packed sequence's first step ℓ is set to 0, as the recurrence's decay there is a constant 0 (no
// gradient to dt or A); the masks keep it out of every product anyway.
//
// The backward recomputes the forward's chunk products (it does not use the recurrence kernels'
// checkpoints, which the forward still writes so either implementation's backward can follow either
// forward), passes the state's gradient back from chunk to chunk, and differentiates each product:
//   dX = Mᵀ·dY + diag(w)·B·dS_outᵀ,   dM = dY·Xᵀ,   dC = (dM∘E∘dt)·B + diag(e_in)·dY·S_in,
//   dB = (dM∘E∘dt)ᵀ·C + diag(w)·X·dS_out,   dℓ_r from the entries of E, e_in and w that hold ℓ_r;
//   dt gets dℓ·A plus its direct uses in M and w.
// The per-sequence final states of cu_seqlens (varlen states) are gathered from the same products
// (varlen_terms). Batch rows run in slices when the temporaries would pass SHAMMIE_SSD_CHUNKED_MB
// (rows_per_slice).
#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/softplus.h>
#include <ATen/ops/softplus_backward.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>

#include "common/env_cap.h"
#include "common/errors.h"
#include "common/impl_override.h"
#include "ssd/ssd_scan.h"

namespace shammie::ssd {
namespace {

constexpr int64_t kChunk = 64;   // Q: steps per chunk
constexpr int64_t kChunkedMinRowsCuda = int64_t(1) << 14;   // auto's threshold on CUDA (chosen_impl)
static_assert(kInterval % kChunk == 0, "checkpoints must fall on chunk starts");

// Sizes of the chunked layouts. Heads split as (group, head in group), so that a group's B and C
// serve all of its heads in one GEMM:
//   rows, step-major   (b, nc, G, Q, hpg, P): x, y and their gradients; flat (…, Q, hpg·P) for the GEMMs
//                      that a group's heads share (a view: G = 1 is Mamba-2's layout as it comes);
//   rows, head-major   (b, nc, G, hpg, Q, P): the per-head (Q, Q) products M·X;
//   per head and step  (b, nc, G, hpg, Q): dt, e_in, w;
//   per group and step (b, nc, G, Q, N): B, C;   states (b, nc, G, hpg·P, N).
struct Shape {
  int64_t b, L, Lp, nc, G, hpg, P, N;
  explicit Shape(const SsdArgs& a)
      : b(a.batch), L(a.seqlen), Lp(0), nc((a.seqlen + kChunk - 1) / kChunk), G(a.groups),
        hpg(a.heads_per_group()), P(a.headdim), N(a.dstate) {
    Lp = nc * kChunk;
  }
};

// (b, L, ...) zero-padded to (b, Lp, ...).
at::Tensor pad_steps(const at::Tensor& t, const Shape& s) {
  if (s.Lp == s.L) return t;
  std::vector<int64_t> shape = t.sizes().vec();
  shape[1] = s.Lp;
  at::Tensor padded = at::zeros(shape, t.options());
  padded.narrow(1, 0, s.L).copy_(t);
  return padded;
}

// (b, L, H, P) <-> step-major rows.
at::Tensor chunk_rows(const at::Tensor& t, const Shape& s) {
  return pad_steps(t, s).view({s.b, s.nc, kChunk, s.G, s.hpg, s.P}).permute({0, 1, 3, 2, 4, 5}).contiguous();
}
at::Tensor unchunk_rows(const at::Tensor& t, const Shape& s) {
  return t.permute({0, 1, 3, 2, 4, 5}).reshape({s.b, s.Lp, s.G * s.hpg, s.P}).narrow(1, 0, s.L);
}
at::Tensor flat(const at::Tensor& rows) { return rows.flatten(-2); }               // (…, Q, hpg·P)
at::Tensor head_major(const at::Tensor& rows) { return rows.transpose(3, 4).contiguous(); }
// A per-head, per-step value beside step-major rows: (b, nc, G, Q, hpg, 1).
at::Tensor beside_rows(const at::Tensor& per_head) { return per_head.transpose(-1, -2).unsqueeze(-1); }
// (b, L, H) <-> per head and step.
at::Tensor chunk_heads(const at::Tensor& t, const Shape& s) {
  return pad_steps(t, s).view({s.b, s.nc, kChunk, s.G, s.hpg}).permute({0, 1, 3, 4, 2}).contiguous();
}
at::Tensor unchunk_heads(const at::Tensor& t, const Shape& s) {
  return t.permute({0, 1, 4, 2, 3}).reshape({s.b, s.Lp, s.G * s.hpg}).narrow(1, 0, s.L);
}
// (b, L, G, N) <-> per group and step.
at::Tensor chunk_groups(const at::Tensor& t, const Shape& s) {
  return pad_steps(t, s).view({s.b, s.nc, kChunk, s.G, s.N}).permute({0, 1, 3, 2, 4}).contiguous();
}
at::Tensor unchunk_groups(const at::Tensor& t, const Shape& s) {
  return t.permute({0, 1, 3, 2, 4}).reshape({s.b, s.Lp, s.G, s.N}).narrow(1, 0, s.L);
}

// Where packed sequences (seq_idx) cut the chunks, as masks in the accumulation dtype or bool.
struct Cuts {
  at::Tensor same;        // (b, nc, 1, 1, Q, Q) bool: steps t and s in the same sequence
  at::Tensor carry_in;    // (b, nc, 1, 1, Q): the chunk's start state reaches step t
  at::Tensor carry_out;   // (b, nc, 1, 1, Q): step s reaches the chunk's end state
  at::Tensor not_start;   // (b, nc, 1, 1, Q): 0 at a sequence's first step
};

Cuts cuts(const at::Tensor& seq_idx, const Shape& s, at::ScalarType acc) {
  at::Tensor starts = at::zeros({s.b, s.Lp}, seq_idx.options().dtype(at::kLong));
  if (s.L > 1) starts.narrow(1, 1, s.L - 1).copy_(seq_idx.narrow(1, 1, s.L - 1).ne(seq_idx.narrow(1, 0, s.L - 1)));
  // Sequence numbers (ids may repeat in seq_idx; a change of id is what starts a sequence); padding
  // steps continue the last one.
  const at::Tensor seg = starts.cumsum(1).view({s.b, s.nc, kChunk});
  const at::Tensor starts_c = starts.view({s.b, s.nc, kChunk});
  const at::Tensor before = (seg.select(2, 0) - starts_c.select(2, 0)).unsqueeze(-1);   // the step before t0
  const at::Tensor last = seg.select(2, kChunk - 1).unsqueeze(-1);
  const auto spread = [&](const at::Tensor& t) { return t.to(acc).view({s.b, s.nc, 1, 1, kChunk}); };
  return {seg.unsqueeze(-1).eq(seg.unsqueeze(-2)).view({s.b, s.nc, 1, 1, kChunk, kChunk}), spread(seg.eq(before)),
          spread(seg.eq(last)), spread(starts_c.eq(0))};
}

// Sums along a chunk's steps as products with 0/1 triangles (Q × Q), not cumsum: torch has no
// deterministic float cumsum on CUDA (it raises under torch.use_deterministic_algorithms), and a
// GEMM this small costs nothing next to the chunk's others.
struct Triangles {
  at::Tensor upto;     // [r, t] = (r ≤ t): v·upto sums steps up to t
  at::Tensor before;   // [r, t] = (r < t): v·before sums steps before t
  at::Tensor from;     // [r, t] = (r ≥ t): v·from sums steps from t on
  Triangles() = default;
  explicit Triangles(const at::TensorOptions& options) {
    const at::Tensor ones = at::ones({kChunk, kChunk}, options);
    upto = ones.triu();
    before = ones.triu(1);
    from = ones.tril();
  }
};

// Z[t,s] = ℓ_{s+1} + … + ℓ_t for s < t, 0 for s ≥ t: the decay exponents of E summed directly, not
// as differences of cumulative sums, which lose the digits that set small decays in float32.
// Built transposed, Zᵀ[s,t] = Σ_r ℓ_r·(s < r)·(r ≤ t), so that the product folds every chunk into
// one GEMM.
at::Tensor segment_sums(const at::Tensor& log_decay, const Triangles& tri) {
  const at::Tensor after_s = tri.before.to(at::kBool);   // [s, r] = (s < r)
  const at::Tensor steps = log_decay.unsqueeze(-2).expand({-1, -1, -1, -1, kChunk, kChunk});   // [s, r] = ℓ_r
  return steps.masked_fill(after_s.logical_not(), 0).matmul(tri.upto).transpose(-1, -2);
}

// The gradient of ℓ_r through Z: ℓ_r is in Z[t,s] exactly when s < r ≤ t, so it collects
// Σ_{t ≥ r} Σ_{s < r} dZ[t,s], summed directly rather than as row sums minus column sums, which cancel.
at::Tensor spanning_sums(const at::Tensor& dZ, const Triangles& tri) {
  const at::Tensor left = dZ.matmul(tri.before);     // [t, r]: Σ_{s < r} dZ[t,s]
  return (left * tri.from).sum(-2);                   // Σ over t ≥ r
}

// The forward's chunk products, which the backward recomputes.
struct Chunked {
  Shape s;
  std::optional<Cuts> cut;
  Triangles tri;
  at::Tensor x_acc;       // (b, L, H, P): x in the accumulation dtype
  at::Tensor dt_in;       // (b, L, H): dt + dt_bias, before softplus
  at::Tensor dt;          // per head and step: dt after bias and softplus
  at::Tensor x, x_heads;  // rows, step-major and head-major
  at::Tensor B, C;        // per group and step
  at::Tensor A;           // (1, 1, G, hpg, 1)
  at::Tensor E, M;        // (b, nc, G, hpg, Q, Q)
  at::Tensor CB;          // (b, nc, G, 1, Q, Q)
  at::Tensor e_in;        // per head and step
  at::Tensor ew, w;       // per head and step: exp(Λ_last − Λ_s) (masked), and that times dt_s
  at::Tensor xw;          // rows, step-major: x_s·w_s
  at::Tensor S_in;        // states: the state before each chunk
  at::Tensor final_state; // (b, G, hpg·P, N)
  at::Tensor inter;       // rows, step-major: C·S_inᵀ, before e_in
  at::Tensor y;           // (b, L, H, P): y before the gate, D·x included
};

// States (…, G, hpg·P, N) with their heads apart, and per-head factors (…, G, hpg) beside them.
at::Tensor per_head_states(const at::Tensor& states, const Shape& s) {
  return states.view({-1, s.G, s.hpg, s.P, s.N});
}
at::Tensor per_head_factor(const at::Tensor& factor) { return factor.unsqueeze(-1).unsqueeze(-1); }

// next = base + decay·prev, per head: a state handed on to the next chunk (forward), its gradient
// handed back (backward), or a packed sequence's state from its chunk's start.
void decay_add(const at::Tensor& next, const at::Tensor& base, const at::Tensor& prev, const at::Tensor& decay,
               const Shape& s) {
  at::Tensor out = per_head_states(next, s);
  at::addcmul_out(out, per_head_states(base, s), per_head_states(prev, s), per_head_factor(decay));
}

Chunked chunked_forward(const SsdArgs& a) {
  Chunked c{Shape(a)};
  const Shape& s = c.s;
  const auto acc = a.A.scalar_type();
  if (a.seq_idx) c.cut = cuts(*a.seq_idx, s, acc);
  c.tri = Triangles(a.A.options());
  const Triangles& tri = c.tri;
  c.x_acc = a.x.to(acc);
  c.dt_in = a.dt.to(acc) + a.dt_bias;
  c.dt = chunk_heads(a.softplus ? at::softplus(c.dt_in) : c.dt_in, s);
  c.x = chunk_rows(c.x_acc, s);
  c.x_heads = head_major(c.x);
  c.B = chunk_groups(a.B, s);
  c.C = chunk_groups(a.C, s);
  c.A = a.A.view({1, 1, s.G, s.hpg, 1});
  at::Tensor log_decay = c.dt * c.A;
  if (c.cut) log_decay = log_decay * c.cut->not_start;
  const at::Tensor exponents = segment_sums(log_decay, tri);

  at::Tensor keep = tri.from.to(at::kBool);   // s ≤ t
  if (c.cut) keep = keep.logical_and(c.cut->same);
  c.E = exponents.masked_fill(keep.logical_not(), -std::numeric_limits<double>::infinity()).exp();
  c.CB = c.C.matmul(c.B.transpose(-1, -2)).unsqueeze(3);
  c.M = c.E * c.CB * c.dt.unsqueeze(-2);

  c.e_in = log_decay.matmul(tri.upto).exp();
  at::Tensor ew = exponents.select(-2, kChunk - 1).exp();   // exp(Λ_last − Λ_s)
  if (c.cut) {
    c.e_in = c.e_in * c.cut->carry_in;
    ew = ew * c.cut->carry_out;
  }
  c.ew = ew;
  c.w = ew * c.dt;
  c.xw = c.x * beside_rows(c.w);
  const at::Tensor chunk_states = flat(c.xw).transpose(-1, -2).matmul(c.B);   // Xᵀ·diag(w)·B, all heads at once

  // The only sequential part: S_in[k + 1] = e_in[k][last]·S_in[k] + chunk_states[k].
  c.S_in = at::empty({s.b, s.nc, s.G, s.hpg * s.P, s.N}, a.A.options());
  if (a.initial_states) c.S_in.select(1, 0).copy_(a.initial_states->view({s.b, s.G, s.hpg * s.P, s.N}));
  else c.S_in.select(1, 0).zero_();
  const at::Tensor decay_out = c.e_in.select(-1, kChunk - 1);
  c.final_state = at::empty({s.b, s.G, s.hpg * s.P, s.N}, a.A.options());
  for (int64_t k = 0; k < s.nc; ++k) {
    const at::Tensor next = k + 1 < s.nc ? c.S_in.select(1, k + 1) : c.final_state;
    decay_add(next, chunk_states.select(1, k), c.S_in.select(1, k), decay_out.select(1, k), s);
  }

  c.inter = c.C.matmul(c.S_in.transpose(-1, -2)).view({s.b, s.nc, s.G, kChunk, s.hpg, s.P});
  const at::Tensor y_rows = c.M.matmul(c.x_heads).transpose(3, 4) + beside_rows(c.e_in) * c.inter;
  c.y = unchunk_rows(y_rows, s) + a.D.view({s.G * s.hpg, s.P}) * c.x_acc;
  return c;
}

at::Tensor gated(const at::Tensor& y, const std::optional<at::Tensor>& z) {
  if (!z) return y;
  const at::Tensor zf = z->to(y.scalar_type());
  return y * zf * zf.sigmoid();
}

// Packed sequences' final states (cu_seqlens, batch 1): sequence j ends at step t_j, row r_j of
// chunk c_j, where its state is
//   S_j = e_in[t_j]·S_in[c_j] + Xᵀ·diag(W_j)·B over chunk c_j,   W_j[s] = E[r_j, s]·dt_s
// (E is zero outside t_j's sequence and after t_j). Gathers by index_select; sums back into chunks
// by one-hot products, which stay deterministic where index_add on CUDA is not.
struct SeqEnds {
  int64_t count = 0;
  at::Tensor seqs, chunks, rows;   // (J,) int64 on the device: sequence id, its last step's chunk and row
  at::Tensor steps;                // (J,): chunk · Q + row, to pick per-step rows
};

SeqEnds seq_ends(const SsdArgs& a) {
  SeqEnds e;
  for (const int64_t t : a.seq_ends) e.count += t >= 0;
  if (e.count == 0) return e;
  const auto host = at::TensorOptions().dtype(at::kLong);
  at::Tensor seqs = at::empty({e.count}, host), steps = at::empty({e.count}, host);
  int64_t j = 0;
  for (int64_t id = 0; id < static_cast<int64_t>(a.seq_ends.size()); ++id) {
    if (a.seq_ends[id] < 0) continue;
    seqs.data_ptr<int64_t>()[j] = id;
    steps.data_ptr<int64_t>()[j++] = a.seq_ends[id];
  }
  e.seqs = seqs.to(a.x.device());
  e.steps = steps.to(a.x.device());
  e.chunks = e.steps.div(kChunk, "floor");
  e.rows = e.steps - e.chunks * kChunk;
  return e;
}

// Batch row 0 of a (1, nc, …) chunked tensor at each sequence's chunk: (J, …).
at::Tensor at_chunks(const at::Tensor& chunked, const SeqEnds& e) { return chunked.select(0, 0).index_select(0, e.chunks); }

// Batch row 0 of a per-step tensor (1, nc, G, hpg, Q, …) at each sequence's last step: (J, G, hpg, …).
at::Tensor at_steps(const at::Tensor& per_step, const SeqEnds& e) {
  const at::Tensor steps_first = per_step.select(0, 0).movedim(3, 1);   // (nc, Q, G, hpg, …)
  std::vector<int64_t> shape = steps_first.sizes().vec();
  shape.erase(shape.begin());
  shape[0] = -1;                                                         // (nc·Q, G, hpg, …)
  return steps_first.reshape(shape).index_select(0, e.steps);
}

// Σ_j contrib[j] into chunk c_j of batch row 0: (1, nc, …) shaped like contrib's rows.
at::Tensor into_chunks(const at::Tensor& contrib, const SeqEnds& e, int64_t nc) {
  const at::Tensor onehot = at::arange(nc, e.chunks.options()).unsqueeze(1).eq(e.chunks.unsqueeze(0));
  std::vector<int64_t> shape = contrib.sizes().vec();
  shape[0] = nc;
  return onehot.to(contrib.scalar_type()).matmul(contrib.reshape({e.count, -1})).view(shape).unsqueeze(0);
}

// A (J, …, Q) per-step contribution that sits at row r_j only: v (J, …) spread over the chunk's rows.
at::Tensor at_row(const at::Tensor& v, const SeqEnds& e) {
  const at::Tensor onehot = at::arange(kChunk, e.rows.options()).unsqueeze(0).eq(e.rows.unsqueeze(1));   // (J, Q)
  std::vector<int64_t> shape(v.dim() + 1, 1);
  shape[0] = e.count;
  shape.back() = kChunk;
  return v.unsqueeze(-1) * onehot.to(v.scalar_type()).view(shape);
}

// The pieces of the varlen states that their backward reuses.
struct VarlenTerms {
  SeqEnds e;
  at::Tensor e_sel;     // (J, G, hpg): e_in at t_j
  at::Tensor E_rows;    // (J, G, hpg, Q): E[r_j, :]
  at::Tensor W;         // (J, G, hpg, Q): E_rows·dt
  at::Tensor x, xw;     // (J, G, Q, hpg, P): chunk c_j's rows, and times W
  at::Tensor B;         // (J, G, Q, N)
  at::Tensor S_in;      // (J, G, hpg·P, N)
};

VarlenTerms varlen_terms(const Chunked& c, const SsdArgs& a) {
  VarlenTerms v{seq_ends(a)};
  if (v.e.count == 0) return v;
  v.e_sel = at_steps(c.e_in, v.e);
  v.E_rows = at_steps(c.E, v.e);
  v.W = v.E_rows * at_chunks(c.dt, v.e);
  v.x = at_chunks(c.x, v.e);
  v.xw = v.x * v.W.transpose(-1, -2).unsqueeze(-1);
  v.B = at_chunks(c.B, v.e);
  v.S_in = at_chunks(c.S_in, v.e);
  return v;
}

void forward_rows(const SsdForwardArgs& args) {
  const SsdArgs& a = args.in;
  const Chunked c = chunked_forward(a);
  const Shape& s = c.s;
  args.out.copy_(gated(c.y, a.z));
  args.final_state.copy_(c.final_state.view(args.final_state.sizes()));
  if (a.num_seqs > 0) {
    const VarlenTerms v = varlen_terms(c, a);
    if (v.e.count > 0) {
      const at::Tensor states = at::empty_like(v.S_in);   // S_j
      decay_add(states, flat(v.xw).transpose(-1, -2).matmul(v.B), v.S_in, v.e_sel, s);
      at::Tensor varlen = args.varlen_states;   // zero-filled: empty sequences keep zeros
      varlen.index_copy_(0, v.e.seqs, states.view({v.e.count, s.G * s.hpg, s.P, s.N}));
    }
  }
  // Checkpoint k is the state before step k·kInterval: chunk k·kInterval/Q's start state.
  const int64_t every = kInterval / kChunk, n_cp = a.checkpoints.size(2);
  const at::Tensor starts = c.S_in.view({s.b, s.nc, s.G * s.hpg, s.P, s.N}).slice(1, 0, (n_cp - 1) * every + 1, every);
  a.checkpoints.copy_(starts.permute({0, 2, 1, 3, 4}));
}

void backward_rows(const SsdBackwardArgs& args) {
  const SsdArgs& a = args.in;
  const Chunked c = chunked_forward(a);
  const Shape& s = c.s;
  const auto acc = a.A.scalar_type();
  const Triangles& tri = c.tri;

  // Through the gate and D.
  at::Tensor dy = args.grad_out.to(acc);
  if (a.z) {
    const at::Tensor z = a.z->to(acc), sig = z.sigmoid();
    args.dz->copy_(dy * c.y * sig * (1 + z * (1 - sig)));
    dy = dy * z * sig;
  }
  const at::Tensor D = a.D.view({s.G * s.hpg, s.P});
  args.dD.add_((dy * c.x_acc).sum({0, 1}).view(args.dD.sizes()));   // dA, dD, ddt_bias: summed over batch slices
  const at::Tensor dY = chunk_rows(dy, s);
  const at::Tensor dY_heads = head_major(dY);
  const at::Tensor dY_e = dY * beside_rows(c.e_in);

  // The state's gradient, passed back from chunk to chunk: dS_out[k] = dS_in[k + 1], and
  // dS_in[k] = e_in[k][last]·dS_out[k] + (diag(e_in)·dY)ᵀ·C.
  at::Tensor from_outputs = flat(dY_e).transpose(-1, -2).matmul(c.C);
  // The varlen states' gradients g_j, where S_j depends on S_in[c_j], e_in[t_j], chunk c_j's x, B and
  // dt, and the decays in E[r_j, :].
  const VarlenTerms v = args.grad_varlen ? varlen_terms(c, a) : VarlenTerms{};
  at::Tensor g, B_g, dW;
  if (v.e.count > 0) {
    const int64_t J = v.e.count;
    g = args.grad_varlen->index_select(0, v.e.seqs).view({J, s.G, s.hpg * s.P, s.N});
    const at::Tensor to_start = (per_head_states(g, s) * per_head_factor(v.e_sel)).view_as(g);
    from_outputs = from_outputs + into_chunks(to_start, v.e, s.nc);
    B_g = v.B.matmul(g.transpose(-1, -2)).view({J, s.G, kChunk, s.hpg, s.P});   // (J, G, Q, hpg, P)
    dW = (v.x * B_g).sum(-1).transpose(-1, -2);                                  // (J, G, hpg, Q)
  }
  at::Tensor dS_out = at::empty({s.b, s.nc, s.G, s.hpg * s.P, s.N}, a.A.options());
  if (args.grad_final) dS_out.select(1, s.nc - 1).copy_(args.grad_final->view({s.b, s.G, s.hpg * s.P, s.N}));
  else dS_out.select(1, s.nc - 1).zero_();
  const at::Tensor decay_out = c.e_in.select(-1, kChunk - 1);
  const auto hand_back = [&](int64_t k, const at::Tensor& into) {   // dS_in[k]
    decay_add(into, from_outputs.select(1, k), dS_out.select(1, k), decay_out.select(1, k), s);
  };
  for (int64_t k = s.nc - 1; k > 0; --k) hand_back(k, dS_out.select(1, k - 1));
  if (args.dinitial_states) hand_back(0, *args.dinitial_states);

  // Y = M·X per head: dX, dM.
  const at::Tensor dX_intra = c.M.transpose(-1, -2).matmul(dY_heads);
  const at::Tensor dM = dY_heads.matmul(c.x_heads.transpose(-1, -2));
  // S_out ∋ Xᵀ·diag(w)·B: dX, dB and dw, each GEMM over all of a group's heads.
  const at::Tensor B_dS = c.B.matmul(dS_out.transpose(-1, -2)).view({s.b, s.nc, s.G, kChunk, s.hpg, s.P});
  at::Tensor dX = dX_intra.transpose(3, 4) + beside_rows(c.w) * B_dS;
  at::Tensor dB = flat(c.xw).matmul(dS_out);
  const at::Tensor dw = (c.x * B_dS).sum(-1).transpose(-1, -2);
  // Y ∋ diag(e_in)·C·S_inᵀ, and S_out ∋ e_in[last]·S_in: dC, de_in.
  at::Tensor dC = flat(dY_e).matmul(c.S_in);
  at::Tensor de_in = (dY * c.inter).sum(-1).transpose(-1, -2);
  de_in.select(-1, kChunk - 1).add_((dS_out * c.S_in).view({s.b, s.nc, s.G, s.hpg, s.P * s.N}).sum(-1));
  if (v.e.count > 0) {
    const at::Tensor to_e = (g * v.S_in).view({v.e.count, s.G, s.hpg, s.P * s.N}).sum(-1);   // (J, G, hpg)
    de_in = de_in + into_chunks(at_row(to_e, v.e), v.e, s.nc);
    dX = dX + into_chunks(v.W.transpose(-1, -2).unsqueeze(-1) * B_g, v.e, s.nc);
    dB = dB + into_chunks(flat(v.xw).matmul(g), v.e, s.nc);
  }
  // M = E∘(C·Bᵀ)∘dt_s: dC, dB through C·Bᵀ (summed over the group's heads), and dt's direct use.
  const at::Tensor dM_E = dM * c.E;
  const at::Tensor dCB = (dM_E * c.dt.unsqueeze(-2)).sum(3);
  dC = dC + dCB.matmul(c.B);
  dB = dB + dCB.transpose(-1, -2).matmul(c.C);
  at::Tensor ddt = (dM_E * c.CB).sum(-2) + dw * c.ew;
  // ℓ_r enters E[t,s] for s < r ≤ t (dE∘E = dM∘M), e_in[t] = exp(ℓ_t0 + … + ℓ_t) for r ≤ t, and
  // w_s = exp(ℓ_{s+1} + … + ℓ_last)·dt_s for s < r.
  at::Tensor dlog_decay = spanning_sums(dM * c.M, tri) + (de_in * c.e_in).matmul(tri.from) + (dw * c.w).matmul(tri.before);
  if (v.e.count > 0) {
    // W_j = E[r_j, :]·dt: dt's direct use, and ℓ_r for s < r ≤ r_j through E's row (dE∘E = dW∘W).
    ddt = ddt + into_chunks(dW * v.E_rows, v.e, s.nc);
    const at::Tensor upto_row = at_row(at::ones_like(v.e_sel), v.e).matmul(tri.from);   // [r] = (r ≤ r_j)
    dlog_decay = dlog_decay + into_chunks((dW * v.W).matmul(tri.before) * upto_row, v.e, s.nc);
  }
  if (c.cut) dlog_decay = dlog_decay * c.cut->not_start;
  ddt = ddt + dlog_decay * c.A;
  args.dA.add_((dlog_decay * c.dt).sum({0, 1, 4}).view(args.dA.sizes()));

  args.dx.copy_(unchunk_rows(dX, s) + D * dy);
  args.dB.copy_(unchunk_groups(dB, s));
  args.dC.copy_(unchunk_groups(dC, s));
  // Back through dt = softplus(dt_raw + dt_bias).
  at::Tensor ddt_raw = unchunk_heads(ddt, s);
  if (a.softplus) ddt_raw = at::softplus_backward(ddt_raw, c.dt_in, 1, 20);
  args.ddt.copy_(ddt_raw);
  args.ddt_bias.add_(ddt_raw.sum({0, 1}));
}

// Batch rows [b0, b0 + n) of everything batch-leading (views; rows are the outermost dim).
at::Tensor rows_of(const at::Tensor& t, int64_t b0, int64_t n) { return t.narrow(0, b0, n); }
std::optional<at::Tensor> rows_of(const std::optional<at::Tensor>& t, int64_t b0, int64_t n) {
  return t ? std::optional<at::Tensor>(t->narrow(0, b0, n)) : std::nullopt;
}

SsdArgs rows_of(const SsdArgs& a, int64_t b0, int64_t n) {
  SsdArgs r = a;
  r.batch = n;
  r.x = rows_of(a.x, b0, n);
  r.dt = rows_of(a.dt, b0, n);
  r.z = rows_of(a.z, b0, n);
  r.B = rows_of(a.B, b0, n);
  r.C = rows_of(a.C, b0, n);
  r.initial_states = rows_of(a.initial_states, b0, n);
  r.seq_idx = rows_of(a.seq_idx, b0, n);
  r.state_slot = rows_of(a.state_slot, b0, n);
  r.checkpoints = rows_of(a.checkpoints, b0, n);
  return r;
}

// The cap on each (rows, seqlen, heads, Q) temporary: SHAMMIE_SSD_CHUNKED_MB MiB (default 256; the
// backward holds about ten of them at once).
int64_t temporary_cap_bytes() { return env_cap_bytes("SHAMMIE_SSD_CHUNKED_MB", 256); }

// One batch row's share of such a temporary.
int64_t temporary_bytes_per_row(const SsdArgs& a) {
  return Shape(a).nc * a.heads * kChunk * kChunk * static_cast<int64_t>(a.A.element_size());
}

// Batch rows per slice, so that each temporary stays within the cap (one row at least).
int64_t rows_per_slice(const SsdArgs& a) {
  return std::clamp<int64_t>(temporary_cap_bytes() / temporary_bytes_per_row(a), 1, a.batch);
}

}  // namespace

Impl chosen_impl(const SsdArgs& a) {
  // Read first, so that a bad value is an error on every call.
  const std::optional<int> forced = impl_override("SHAMMIE_SSD_IMPL", {"kernel", "chunked"});
  if (forced) return static_cast<Impl>(*forced);
  // CPU: the kernels, which win there at every measured shape (benchmarks/RESULTS.md, session 15).
  if (!a.x.is_cuda()) return Impl::kKernel;
  // CUDA: the chunked form from kChunkedMinRowsCuda (batch · seqlen · heads), and always under
  // torch.use_deterministic_algorithms (the kernels' backward sums with float atomics). The threshold
  // comes from floors, not yet from a GPU timing: the kernels ran 22 ms forward and about 100 ms
  // backward at 8 · 2048 · 24 on an H200, about 56 ns per (b, t, h) forward, where the chunked form
  // is a few dozen launches plus GEMMs (RESULTS.md, session 15).
  if (at::globalContext().deterministicAlgorithms()) return Impl::kChunked;
  // Not where one batch row alone passes the temporaries' cap (a long sequence): the kernels hold
  // only their checkpoints.
  if (temporary_bytes_per_row(a) > temporary_cap_bytes()) return Impl::kKernel;
  return a.batch * a.seqlen * a.heads >= kChunkedMinRowsCuda ? Impl::kChunked : Impl::kKernel;
}

void forward_chunked(const SsdForwardArgs& args) {
  const int64_t step = rows_per_slice(args.in);
  for (int64_t b0 = 0; b0 < args.in.batch; b0 += step) {
    const int64_t n = std::min(step, args.in.batch - b0);
    forward_rows({rows_of(args.in, b0, n), rows_of(args.out, b0, n), rows_of(args.final_state, b0, n),
                  args.varlen_states});
  }
}

void backward_chunked(const SsdBackwardArgs& args) {
  const int64_t step = rows_per_slice(args.in);
  for (int64_t b0 = 0; b0 < args.in.batch; b0 += step) {
    const int64_t n = std::min(step, args.in.batch - b0);
    backward_rows({rows_of(args.in, b0, n), rows_of(args.grad_out, b0, n), rows_of(args.grad_final, b0, n),
                   args.grad_varlen, rows_of(args.dx, b0, n), rows_of(args.ddt, b0, n), rows_of(args.dz, b0, n),
                   args.dA, rows_of(args.dB, b0, n), rows_of(args.dC, b0, n), args.dD, args.ddt_bias,
                   rows_of(args.dinitial_states, b0, n)});
  }
}

}  // namespace shammie::ssd
