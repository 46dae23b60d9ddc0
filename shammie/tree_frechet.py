"""Exact Fréchet top-k on a tree, the search of Loki's TreeMetric: the op wrapper and its fake.

For probabilities p over observed labels λ_1..λ_K, f(y) = Σ_k p_k · d(y, λ_k)² for every candidate
label y of a tree metric; returns the k smallest values with their label ids (ascending, ties to the
lowest id). The inputs are a *plan* that `shammie.loki.TreeMetric` builds once per observed set: the
subtree S of the observed labels' ancestors in preorder, and for each node of S its nearest candidate
labels (itself at distance 0, then those hanging off S there). A sample costs O(|S|·k), not O(N).
Kernels: csrc/loki/.
"""

from __future__ import annotations

import torch

_FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tree_frechet_topk(probs: torch.Tensor, parent: torch.Tensor, edge: torch.Tensor, depth: torch.Tensor,
                      obs_pos: torch.Tensor, cand_t: torch.Tensor, cand_label: torch.Tensor,
                      k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (B, K); the plan: parent (M,) int64 positions in preorder (−1 at 0), edge (M,) and depth
    (M,) lengths, obs_pos (K,) int64, cand_t (M, J) and cand_label (M, J) int64 (−1 = none).
    Returns values (B, k) in probs' dtype (accumulated in float32, or float64) and label ids (B, k)."""
    return torch.ops.shammie.tree_frechet_topk(probs, parent, edge, depth, obs_pos, cand_t, cand_label, k)


@torch.library.register_fake("shammie::tree_frechet_topk")
def _(probs, parent, edge, depth, obs_pos, cand_t, cand_label, k):
    """The checks of csrc/loki/tree_frechet.cpp that need no values, in its order. The plan's values
    (preorder, ranges, the number of listed candidates, which bounds k) are checked by the op."""
    op = "tree_frechet_topk"
    if probs.dim() != 2:
        raise ValueError(f"{op}: probs must be 2-D (batch, num_observed), got a tensor of shape {tuple(probs.shape)}")
    if probs.dtype not in _FLOATING:
        raise TypeError(f"{op}: probs must be float32, float16, bfloat16 or float64, got {probs.dtype}")
    for name, t, rank, layout in (("parent", parent, 1, "(nodes,)"), ("obs_pos", obs_pos, 1, "(num_observed,)"),
                                  ("cand_label", cand_label, 2, "(nodes, per_node)")):
        if t.dim() != rank:
            raise ValueError(f"{op}: {name} must be {rank}-D {layout}, got a tensor of shape {list(t.shape)}")
        if t.dtype != torch.int64:
            raise TypeError(f"{op}: {name} must be int64, got {t.dtype}")
    nodes = parent.shape[0]
    if nodes < 1:
        raise ValueError(f"{op}: the plan must have at least one node (parent is empty)")
    if obs_pos.shape[0] != probs.shape[1]:
        raise ValueError(f"{op}: probs has {probs.shape[1]} observed classes (dimension 1) but obs_pos has {obs_pos.shape[0]}")
    for name, t in (("edge", edge), ("depth", depth)):
        if tuple(t.shape) != (nodes,):
            raise ValueError(f"{op}: {name} must have shape (nodes,) = [{nodes}], got {list(t.shape)}")
    if cand_label.shape[0] != nodes:
        raise ValueError(f"{op}: cand_label must be (nodes, per_node) with nodes = {nodes}, got {list(cand_label.shape)}")
    if cand_t.shape != cand_label.shape:
        raise ValueError(f"{op}: cand_t must have shape (nodes, per_node), like cand_label = {list(cand_label.shape)}, "
                         f"got {list(cand_t.shape)}")
    for name, t in (("edge", edge), ("depth", depth), ("cand_t", cand_t)):
        if t.dtype not in _FLOATING:
            raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    for name, t in (("parent", parent), ("edge", edge), ("depth", depth), ("obs_pos", obs_pos), ("cand_t", cand_t),
                    ("cand_label", cand_label)):
        if t.device != probs.device:
            raise ValueError(f"{op}: {name} must be on the same device as probs ({probs.device}), got {t.device}")
    if k < 1:
        raise ValueError(f"{op}: k must be at least 1, got {k}")
    if cand_label.shape[1] < 1:
        raise ValueError(f"{op}: cand_label must list at least one slot per node, got {list(cand_label.shape)}")
    if k > cand_label.numel():  # the op counts the listed (non −1) slots; their number is at most this
        raise ValueError(f"{op}: k = {k} exceeds the number of candidates listed (at most {cand_label.numel()})")
    return probs.new_empty((probs.shape[0], k)), probs.new_empty((probs.shape[0], k), dtype=torch.int64)
