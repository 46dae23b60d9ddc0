"""Shared argument checks of the Loki metrics and the calls into the dense search ops."""

from __future__ import annotations

import torch

import shammie


def check_probs(probs: torch.Tensor, num_observed: int) -> torch.Tensor:
    """probs (B, K) or (K,): floating, finite, non-negative, each row with a positive sum."""
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
    if probs.dim() == 1:
        probs = probs.unsqueeze(0)
    if probs.dim() != 2:
        raise ValueError(f"probs must be (batch, num_observed) or (num_observed,), got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be a floating tensor, got {probs.dtype}")
    if probs.shape[1] != num_observed:
        raise ValueError(f"probs has {probs.shape[1]} columns but there are {num_observed} observed labels (K mismatch)")
    if probs.numel():
        # Two reductions instead of one pass per condition: NaN and inf propagate into the row sums.
        rows, low = probs.sum(dim=1), probs.amin()
        if not bool(torch.isfinite(rows).all()) or bool(torch.isnan(low)):
            raise ValueError("probs must be finite (found NaN or inf)")
        if bool(low < 0):
            raise ValueError("probs must be non-negative (found a negative weight)")
        if bool((rows <= 0).any()):
            raise ValueError("each row of probs must have a positive sum")
    return probs


def check_labels(ids, num_labels: int, name: str) -> torch.Tensor:
    """A LongTensor (n,) of label ids in [0, num_labels)."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be a 1-D integer tensor of label ids, got {ids.dtype} of shape {tuple(ids.shape)}")
    ids = ids.long()
    if ids.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_labels:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds label id {bad}, out of range [0, {num_labels})")
    return ids


def candidate_mask(candidates, num_labels: int) -> torch.Tensor | None:
    """A bool mask (N,) from None, a bool mask or an index tensor (checked)."""
    if candidates is None:
        return None
    candidates = torch.as_tensor(candidates)
    if candidates.dtype == torch.bool:
        if candidates.shape != (num_labels,):
            raise ValueError(f"a candidates mask must have shape ({num_labels},), got {tuple(candidates.shape)}")
        return candidates.cpu()
    ids = check_labels(candidates, num_labels, "candidates").cpu()
    mask = torch.zeros(num_labels, dtype=torch.bool)
    mask[ids] = True
    return mask


def check_k(k: int, mask: torch.Tensor | None, num_labels: int) -> None:
    n = num_labels if mask is None else int(mask.sum())
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(f"k = {k} exceeds the number of candidates ({n})")


def frechet_topk(probs: torch.Tensor, sq_dists: torch.Tensor, k: int, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """k smallest of probs @ sq_dists over the candidates (shammie's dense op). Half-precision probs are
    widened to float32 rather than sq_dists narrowed: a squared distance above 65,504 is inf in float16
    (a distance above 256), and bfloat16 keeps 8 bits of it. Values come back in probs' dtype."""
    mask = None if mask is None else mask.to(probs.device)
    wide = torch.float64 if probs.dtype == torch.float64 else torch.float32
    values, indices = shammie.frechet_topk(probs.to(wide), sq_dists.to(device=probs.device, dtype=wide), k=k,
                                           candidates=mask)
    return values.to(probs.dtype), indices


def gemm_bias_topk(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, k: int, mask):
    """k smallest of bias + x @ w over the candidates (shammie's fused op)."""
    mask = None if mask is None else mask.to(x.device)
    return shammie.gemm_bias_topk(x, w, bias, k=k, candidates=mask)
