// CPU kernel of the tree Fréchet top-k (math in tree_frechet.h), compiled once per instruction set.
// Samples go in blocks of L lanes laid out [node][lane], so that each sweep step is one loop over
// the lanes that GCC vectorizes; blocks run in parallel. The up-sweep's sums P, Q are overwritten in
// place by the down-sweep's g, f (a node's own sums are read just before), so a block needs 2·|S|·L
// accumulators, allocated once per thread chunk.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/cpu_isa.h"
#include "loki/tree_frechet.h"

SHAMMIE_CPU_TARGET_BEGIN

namespace shammie::SHAMMIE_CPU_NAMESPACE {
namespace {

using namespace tree_frechet;

template <typename acc_t, int L>
struct Block {
  std::vector<acc_t> a, b;     // (nodes, L): P then g; Q then f
  std::vector<acc_t> top_v;    // (k, L)
  std::vector<int64_t> top_i;  // (k, L)
  Block(int64_t nodes, int64_t k) : a(nodes * L), b(nodes * L), top_v(k * L), top_i(k * L) {}
};

template <typename scalar_t, typename acc_t, int L>
void run_block(const Args& args, int64_t b0, Block<acc_t, L>& blk) {
  const int64_t nb = std::min<int64_t>(L, args.batch - b0), K = args.num_obs, M = args.nodes;
  const int64_t J = args.per_node, k = args.k;
  const scalar_t* probs = args.probs.const_data_ptr<scalar_t>();
  const int64_t* parent = args.parent.const_data_ptr<int64_t>();
  const acc_t* edge = args.edge.const_data_ptr<acc_t>();
  const acc_t* depth = args.depth.const_data_ptr<acc_t>();
  const int64_t* obs = args.obs_pos.const_data_ptr<int64_t>();
  const acc_t* cand_t = args.cand_t.const_data_ptr<acc_t>();
  const int64_t* cand_label = args.cand_label.const_data_ptr<int64_t>();
  acc_t* A = blk.a.data();
  acc_t* Bq = blk.b.data();
  std::fill(blk.a.begin(), blk.a.end(), acc_t(0));
  std::fill(blk.b.begin(), blk.b.end(), acc_t(0));
  std::fill(blk.top_v.begin(), blk.top_v.end(), std::numeric_limits<acc_t>::infinity());
  std::fill(blk.top_i.begin(), blk.top_i.end(), std::numeric_limits<int64_t>::max());

  // Observed weights into their nodes; f at the root directly.
  alignas(64) acc_t p[L], froot[L], total[L];
  for (int l = 0; l < L; ++l) froot[l] = acc_t(0);
  const acc_t depth0 = depth[0];
  for (int64_t j = 0; j < K; ++j) {
    for (int l = 0; l < L; ++l) p[l] = l < nb ? static_cast<acc_t>(probs[(b0 + l) * K + j]) : acc_t(0);
    const int64_t pos = obs[j];
    const acc_t dep = depth[pos], d = dep - depth0;
    acc_t* ap = A + pos * L;
    acc_t* bp = Bq + pos * L;
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      ap[l] += p[l];
      bp[l] += p[l] * dep;
      froot[l] += p[l] * d * d;
    }
  }
  // Up-sweep: subtree sums, children before parents.
  for (int64_t i = M - 1; i >= 1; --i) {
    const acc_t* ai = A + i * L;
    const acc_t* bi = Bq + i * L;
    acc_t* ap = A + parent[i] * L;
    acc_t* bp = Bq + parent[i] * L;
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      ap[l] += ai[l];
      bp[l] += bi[l];
    }
  }
  acc_t* top_v = blk.top_v.data();
  int64_t* top_i = blk.top_i.data();
  // Score node i's listed candidates from its f (in Bq) and g (in A).
  auto score = [&](int64_t i) {
    const acc_t* g = A + i * L;
    const acc_t* f = Bq + i * L;
    for (int64_t j = 0; j < J; ++j) {
      const int64_t label = cand_label[i * J + j];
      if (label < 0) break;
      const acc_t t = cand_t[i * J + j];
      if (k == 1) {
#pragma omp simd
        for (int l = 0; l < L; ++l) {
          const acc_t v = hang(f[l], g[l], total[l], t);
          const bool better = comes_before(v, label, top_v[l], top_i[l]);
          top_v[l] = better ? v : top_v[l];
          top_i[l] = better ? label : top_i[l];
        }
      } else {
        for (int l = 0; l < L; ++l) topk_insert(top_v + l, top_i + l, k, L, hang(f[l], g[l], total[l], t), label);
      }
    }
  };
  // Root: g = Σ p·d(root, λ), f = Σ p·d(root, λ)².
#pragma omp simd
  for (int l = 0; l < L; ++l) {
    total[l] = A[l];
    A[l] = Bq[l] - depth0 * A[l];
    Bq[l] = froot[l];
  }
  score(0);
  // Down-sweep: parents before children; node i's P, Q become its g, f.
  for (int64_t i = 1; i < M; ++i) {
    const acc_t e = edge[i], depth_a = depth[parent[i]];
    const acc_t* ga = A + parent[i] * L;
    const acc_t* fa = Bq + parent[i] * L;
    acc_t* ai = A + i * L;
    acc_t* bi = Bq + i * L;
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      acc_t f, g;
      reroot(fa[l], ga[l], ai[l], bi[l], depth_a, e, total[l], f, g);
      ai[l] = g;
      bi[l] = f;
    }
    score(i);
  }
  scalar_t* values = args.values.mutable_data_ptr<scalar_t>();
  int64_t* indices = args.indices.mutable_data_ptr<int64_t>();
  for (int64_t l = 0; l < nb; ++l) {
    for (int64_t r = 0; r < k; ++r) {
      values[(b0 + l) * k + r] = static_cast<scalar_t>(top_v[r * L + l]);
      indices[(b0 + l) * k + r] = top_i[r * L + l];
    }
  }
}

template <typename scalar_t>
void topk_typed(const Args& args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = sizeof(acc_t) == 4 ? 16 : 8;
  const int64_t blocks = (args.batch + L - 1) / L;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    Block<acc_t, L> blk(args.nodes, args.k);
    for (int64_t blk_id = begin; blk_id < end; ++blk_id) run_block<scalar_t, acc_t, L>(args, blk_id * L, blk);
  });
}

}  // namespace

void tree_frechet_topk(const Args& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.probs.scalar_type(), "tree_frechet_topk_cpu",
                                  [&] { topk_typed<scalar_t>(args); });
}

}  // namespace shammie::SHAMMIE_CPU_NAMESPACE

SHAMMIE_CPU_TARGET_END
