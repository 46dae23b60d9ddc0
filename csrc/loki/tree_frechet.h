// Exact Fréchet top-k on a tree metric, Loki's search without a K×N distance matrix:
//   f(y) = Σ_k p_k · d(y, λ_k)²   over candidate labels y, k smallest, ties to the lowest label id.
// The plan (built once per metric and observed set by shammie/loki) is the subtree S of the ancestors
// of the observed nodes, in preorder (parent before child, root at position 0). Per sample:
//   up-sweep    P(c) = Σ p over c's subtree, Q(c) = Σ p·depth over it;
//   root        g = Σ p·d(root, λ), f = Σ p·d(root, λ)²;
//   down-sweep  the rerooting identities along each edge a → c of length e (see reroot below);
//   candidates  each node a of S lists the J nearest candidate labels attached to it (a itself at
//               t = 0, then the labels off S whose nearest S node is a, at t = d(y, a)), scored as
//               f(y) = f(a) + 2t·g(a) + t²·Σp, which grows with t, so J = k of them suffice.
// A sample costs O(|S|·J), whatever the tree's size. This header holds the math both kernels share.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

#include "common/host_device.h"

namespace shammie::tree_frechet {

// f(c), g(c) from f(a), g(a) across the edge a → c of length e, where P_c, Q_c are c's subtree sums
// and depth_a is a's depth: labels inside c's subtree come e closer, the others e farther.
//   g(c) = g(a) + e·(Σp − 2P_c)
//   f(c) = f(a) + e·(e·Σp + 2g(a) − 4·G_c),   G_c = Σ_{λ under c} p·d(a, λ) = Q_c − depth_a·P_c
template <typename T>
SHAMMIE_HD void reroot(T f_a, T g_a, T P_c, T Q_c, T depth_a, T e, T total, T& f_c, T& g_c) {
  const T inside = Q_c - depth_a * P_c;
  g_c = g_a + e * (total - T(2) * P_c);
  f_c = f_a + e * (e * total + T(2) * g_a - T(4) * inside);
}

// f(y) for a label y hanging at distance t from node a of S.
template <typename T>
SHAMMIE_HD T hang(T f_a, T g_a, T total, T t) { return f_a + t * (T(2) * g_a + t * total); }

// Does (v, i) come before (bv, bi): smaller value, ties to the lower label id.
template <typename T>
SHAMMIE_HD bool comes_before(T v, int64_t i, T bv, int64_t bi) { return v < bv || (v == bv && i < bi); }

// Insert (v, i) into the sorted list vals/ids of length k (element r at r·stride) if it belongs there.
template <typename T>
SHAMMIE_HD void topk_insert(T* vals, int64_t* ids, int64_t k, int64_t stride, T v, int64_t i) {
  if (!comes_before(v, i, vals[(k - 1) * stride], ids[(k - 1) * stride])) return;
  int64_t r = k - 1;
  while (r > 0 && comes_before(v, i, vals[(r - 1) * stride], ids[(r - 1) * stride])) {
    vals[r * stride] = vals[(r - 1) * stride];
    ids[r * stride] = ids[(r - 1) * stride];
    --r;
  }
  vals[r * stride] = v;
  ids[r * stride] = i;
}

struct Args {
  int64_t batch, num_obs, nodes, per_node, k;
  at::Tensor probs;       // (batch, num_obs), contiguous, any floating dtype
  at::Tensor parent;      // (nodes,) int64, parent's position in S, −1 at position 0, parent[i] < i
  at::Tensor edge;        // (nodes,) edge length to the parent, in the accumulation dtype
  at::Tensor depth;       // (nodes,) distance from the tree's root, in the accumulation dtype
  at::Tensor obs_pos;     // (num_obs,) int64, position in S of each observed label
  at::Tensor cand_t;      // (nodes, per_node) distance of each listed candidate, accumulation dtype
  at::Tensor cand_label;  // (nodes, per_node) int64 label id, −1 after the last one
  at::Tensor values;      // (batch, k), probs' dtype
  at::Tensor indices;     // (batch, k) int64
};

using Kernel = void (*)(const Args&);

std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor& probs, const at::Tensor& parent, const at::Tensor& edge,
                                        const at::Tensor& depth, const at::Tensor& obs_pos, const at::Tensor& cand_t,
                                        const at::Tensor& cand_label, int64_t k, Kernel kernel);

}  // namespace shammie::tree_frechet
