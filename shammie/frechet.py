"""Fréchet-mean search (Loki): the public functions and fakes. Kernels: csrc/frechet/.

frechet_topk returns, for each row b of probs (B, K), the k labels y with the smallest
f_b(y) = Σ_j probs[b, j] · sq_dists[j, y] over the candidate labels; gemm_bias_topk the k smallest (or
largest) of bias[y] + Σ_j x[b, j] · w[j, y]. Values ascend (descend for largest), ties go to the lowest
label id, and the (B, N) score matrix is never built. No autograd: these are searches.

candidates (N,) bool mask or int64 label ids) name a *set*: repeated ids count once, so k may be at
most the number of distinct candidates, and no label comes back twice. NaN scores are never chosen: a
row with fewer than k non-NaN scores fills the rest of its k slots with index −1 and value NaN.

The fakes (torch.compile, meta) make every check that needs only shapes, dtypes and devices, the same
as the kernels, and return (B, k) like them. Counting distinct ids needs their values, so a fake checks
k against len(candidates) (a bound) and the real op raises for k above the distinct count.
"""

from __future__ import annotations

import torch

from shammie._checks import same_device, same_dtype_and_device

_FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def frechet_topk(probs: torch.Tensor, sq_dists: torch.Tensor, k: int = 1,
                 candidates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k labels minimizing Σ_j probs[b, j] · sq_dists[j, y], as (values, indices), each (B, k).

    probs (B, K) must be non-negative with no NaN; sq_dists (K, N) holds squared distances from the K
    observed classes to the N labels. candidates restricts the search: a bool mask (N,) or int64 label
    ids (repeats count once). float32, float16 and bfloat16 accumulate in float32, float64 in float64;
    values come back in the inputs' dtype, indices as int64. A row with fewer than k non-NaN scores
    (NaN in sq_dists) ends in index −1 with value NaN.
    """
    return torch.ops.shammie.frechet_topk(probs, sq_dists, k, candidates)


def gemm_bias_topk(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, k: int = 1,
                   candidates: torch.Tensor | None = None,
                   largest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest (largest=True: largest) of bias[y] + Σ_j x[b, j] · w[j, y] over the candidate
    labels y, as (values, indices), each (B, k); x (B, K), w (K, N), bias (N,). NaN scores are never
    chosen: a row with fewer than k non-NaN scores ends in index −1 with value NaN. frechet_topk is this
    with no bias."""
    return torch.ops.shammie.gemm_bias_topk(x, w, bias, k, candidates, largest)


def _check(op: str, x, w, bias, k, candidates) -> None:
    """The metadata checks of csrc/frechet/frechet.cpp, for fake tensors (value checks run in the op)."""
    xname, wname = ("probs", "sq_dists") if op == "frechet_topk" else ("x", "w")
    if x.dim() != 2:
        raise ValueError(f"{op}: {xname} must be 2-D (B, K), got a tensor of shape {tuple(x.shape)}")
    if x.dtype not in _FLOATING:
        raise TypeError(f"{op}: {xname} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{op}: {wname} must be 2-D (K, N), got a tensor of shape {tuple(w.shape)}")
    same_dtype_and_device(op, xname, x, ((wname, w), ("bias", bias)))
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"{op}: {xname} is (B, K) = {tuple(x.shape)} and {wname} is (K, N) = {tuple(w.shape)}: "
                         "their K must match")
    if bias is not None and tuple(bias.shape) != (w.shape[1],):
        raise ValueError(f"{op}: bias must have shape (N,) = ({w.shape[1]},), got {tuple(bias.shape)}")
    if k < 1:
        raise ValueError(f"{op}: k must be at least 1, got {k}")
    if candidates is not None:
        same_device(op, "x", x, (("candidates", candidates),))
        if candidates.dim() != 1:
            raise ValueError(f"{op}: candidates must be 1-D (a bool mask of shape (N,) or int64 label ids), "
                             f"got a tensor of shape {list(candidates.shape)}")
        if candidates.dtype == torch.bool and candidates.shape[0] != w.shape[1]:
            raise ValueError(f"{op}: a bool candidates mask must have shape (N,) = ({w.shape[1]},), "
                             f"got {list(candidates.shape)}")
        if candidates.dtype not in (torch.bool, torch.int64):
            raise TypeError(f"{op}: candidates must be a bool mask or an int64 (long) tensor of label ids, "
                            f"got {candidates.dtype}")
    # Without values the fake cannot count distinct ids: len(candidates) bounds it (the op checks exactly).
    count = w.shape[1] if candidates is None or candidates.dtype == torch.bool else candidates.numel()
    if k > count:
        raise ValueError(f"{op}: k = {k} is more than the number of candidate labels ({count})")


def _outputs(x, k):
    return x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.int64)


@torch.library.register_fake("shammie::frechet_topk")
def _(probs, sq_dists, k, candidates):
    _check("frechet_topk", probs, sq_dists, None, k, candidates)
    return _outputs(probs, k)


@torch.library.register_fake("shammie::gemm_bias_topk")
def _(x, w, bias, k, candidates, largest):
    _check("gemm_bias_topk", x, w, bias, k, candidates)
    return _outputs(x, k)
