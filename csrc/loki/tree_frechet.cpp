// Tree Fréchet top-k: schema, the front end shared by CPU and CUDA (checks, plan conversion, output
// allocation) and the CPU registration. Math in tree_frechet.h; CPU kernel in tree_frechet_cpu_kernels.cpp.
#include "loki/tree_frechet.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace shammie {

SHAMMIE_DECLARE_CPU_KERNELS(void tree_frechet_topk(const tree_frechet::Args& args);)

namespace tree_frechet {
namespace {

constexpr const char* kOp = "tree_frechet_topk";

void check_index(Arg a, int64_t rank, const char* layout) {
  check_rank(kOp, a, rank, layout);
  SHAMMIE_CHECK_TYPE(a.tensor.scalar_type() == at::kLong, kOp, ": ", a.name, " must be int64, got ",
                   a.tensor.scalar_type());
}

// The plan's structure, which the kernels index by without further checks. A CUDA plan is copied to
// the host for this (a few KB and one sync per call; the search itself is much longer): a bad plan
// must raise here, not read out of bounds on the device.
void check_plan_values(const Args& a) {
  const at::Tensor parent_host = a.parent.cpu(), obs_host = a.obs_pos.cpu(), labels_host = a.cand_label.cpu();
  const int64_t* parent = parent_host.const_data_ptr<int64_t>();
  SHAMMIE_CHECK_VALUE(parent[0] == -1, kOp, ": parent[0] must be -1 (position 0 is the root), got ", parent[0]);
  for (int64_t i = 1; i < a.nodes; ++i) {
    SHAMMIE_CHECK_VALUE(parent[i] >= 0 && parent[i] < i, kOp, ": parent must list nodes in preorder (0 <= parent[i] < i), got parent[",
                      i, "] = ", parent[i]);
  }
  const int64_t* obs = obs_host.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < a.num_obs; ++j) {
    SHAMMIE_CHECK_VALUE(obs[j] >= 0 && obs[j] < a.nodes, kOp, ": obs_pos[", j, "] = ", obs[j],
                      " is out of range for ", a.nodes, " nodes");
  }
  const int64_t* labels = labels_host.const_data_ptr<int64_t>();
  int64_t listed = 0;
  for (int64_t i = 0; i < a.nodes * a.per_node; ++i) {
    SHAMMIE_CHECK_VALUE(labels[i] >= -1, kOp, ": cand_label must be a label id or -1, got ", labels[i]);
    listed += labels[i] >= 0;
  }
  SHAMMIE_CHECK_VALUE(listed >= a.k, kOp, ": k = ", a.k, " exceeds the number of candidates listed (", listed, ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor& probs, const at::Tensor& parent, const at::Tensor& edge,
                                        const at::Tensor& depth, const at::Tensor& obs_pos, const at::Tensor& cand_t,
                                        const at::Tensor& cand_label, int64_t k, Kernel kernel) {
  check_rank(kOp, {probs, "probs"}, 2, "(batch, num_observed)");
  check_floating(kOp, {probs, "probs"});
  check_index({parent, "parent"}, 1, "(nodes,)");
  check_index({obs_pos, "obs_pos"}, 1, "(num_observed,)");
  check_index({cand_label, "cand_label"}, 2, "(nodes, per_node)");
  const int64_t nodes = parent.size(0);
  SHAMMIE_CHECK_VALUE(nodes >= 1, kOp, ": the plan must have at least one node (parent is empty)");
  SHAMMIE_CHECK_VALUE(obs_pos.size(0) == probs.size(1), kOp, ": probs has ", probs.size(1),
                    " observed classes (dimension 1) but obs_pos has ", obs_pos.size(0));
  check_shape(kOp, {edge, "edge"}, {nodes}, "(nodes,)");
  check_shape(kOp, {depth, "depth"}, {nodes}, "(nodes,)");
  SHAMMIE_CHECK_VALUE(cand_label.size(0) == nodes, kOp, ": cand_label must be (nodes, per_node) with nodes = ", nodes,
                    ", got ", cand_label.sizes());
  check_shape(kOp, {cand_t, "cand_t"}, cand_label.sizes(), "(nodes, per_node), like cand_label");
  for (Arg a : {Arg{edge, "edge"}, Arg{depth, "depth"}, Arg{cand_t, "cand_t"}}) check_floating(kOp, a);
  for (Arg a : {Arg{parent, "parent"}, Arg{edge, "edge"}, Arg{depth, "depth"}, Arg{obs_pos, "obs_pos"},
                Arg{cand_t, "cand_t"}, Arg{cand_label, "cand_label"}}) {
    check_same_device(kOp, {probs, "probs"}, a);
  }
  SHAMMIE_CHECK_VALUE(k >= 1, kOp, ": k must be at least 1, got ", k);

  const auto acc = probs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Args args{probs.size(0), probs.size(1), nodes, cand_label.size(1), k, probs.contiguous(), parent.contiguous(),
            edge.to(acc).contiguous(), depth.to(acc).contiguous(), obs_pos.contiguous(), cand_t.to(acc).contiguous(),
            cand_label.contiguous(), at::empty({probs.size(0), k}, probs.options()),
            at::empty({probs.size(0), k}, probs.options().dtype(at::kLong))};
  SHAMMIE_CHECK_VALUE(args.per_node >= 1, kOp, ": cand_label must list at least one slot per node, got ", cand_label.sizes());
  check_plan_values(args);
  if (args.batch > 0) kernel(args);
  return {args.values, args.indices};
}

}  // namespace tree_frechet

namespace {
void topk_cpu(const tree_frechet::Args& a) { SHAMMIE_CPU_DISPATCH(tree_frechet_topk, a); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(shammie, m) {
  m.def(
      "tree_frechet_topk(Tensor probs, Tensor parent, Tensor edge, Tensor depth, Tensor obs_pos, Tensor cand_t, "
      "Tensor cand_label, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shammie, CPU, m) {
  m.impl("tree_frechet_topk", [](const at::Tensor& probs, const at::Tensor& parent, const at::Tensor& edge,
                                 const at::Tensor& depth, const at::Tensor& obs_pos, const at::Tensor& cand_t,
                                 const at::Tensor& cand_label, int64_t k) {
    return tree_frechet::topk(probs, parent, edge, depth, obs_pos, cand_t, cand_label, k, topk_cpu);
  });
}

}  // namespace shammie
