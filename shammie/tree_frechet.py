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
    op = "tree_frechet_topk"
    if probs.dim() != 2:
        raise ValueError(f"{op}: probs must be 2-D (batch, num_observed), got a tensor of shape {tuple(probs.shape)}")
    if probs.dtype not in _FLOATING:
        raise TypeError(f"{op}: probs must be float32, float16, bfloat16 or float64, got {probs.dtype}")
    for name, t in (("parent", parent), ("obs_pos", obs_pos), ("cand_label", cand_label)):
        if t.dtype != torch.int64:
            raise TypeError(f"{op}: {name} must be int64, got {t.dtype}")
    if obs_pos.shape != (probs.shape[1],):
        raise ValueError(f"{op}: probs has {probs.shape[1]} observed classes (dimension 1) but obs_pos has shape {tuple(obs_pos.shape)}")
    if k < 1:
        raise ValueError(f"{op}: k must be at least 1, got {k}")
    return probs.new_empty((probs.shape[0], k)), probs.new_empty((probs.shape[0], k), dtype=torch.int64)
