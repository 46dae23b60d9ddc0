"""Synthetic labeling functions with known accuracies for a finite metric label space: y uniform, each LF
votes λ_a ~ p(λ | y) ∝ exp(−θ_a·d²(λ, y)) or abstains. Used by the tests and examples/ws_metric.py."""

from __future__ import annotations

import torch

from shammie.ws.metric import as_metric, sq_block

__all__ = ["expected_sq_dists", "sample_lfs"]


def sample_lfs(metric, theta: torch.Tensor, n: int, abstain: float | torch.Tensor = 0.0,
               generator: torch.Generator | None = None):
    """Draw (L (n, m) int64 with -1 = abstain, y (n,) int64) from the model above (y uniform)."""
    metric = as_metric(metric)
    N = int(metric.num_labels)
    D = sq_block(metric)
    theta = torch.as_tensor(theta, dtype=torch.float64)
    abstain = torch.as_tensor(abstain, dtype=torch.float64).expand(theta.shape)
    y = torch.randint(0, N, (n,), generator=generator)
    cols = []
    for a in range(theta.numel()):  # a loop over LFs (m is small); rows are batched
        probs = torch.softmax(-theta[a] * D[y], dim=1)
        lam = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        drop = torch.rand(n, generator=generator, dtype=torch.float64) < abstain[a]
        cols.append(torch.where(drop, torch.full_like(lam, -1), lam))
    return torch.stack(cols, 1), y


def expected_sq_dists(metric, theta: torch.Tensor) -> torch.Tensor:
    """The exact E d²(λ_a, y) (m,) under the model above with y uniform: what θ̂ = 1/E d² estimates."""
    D = sq_block(as_metric(metric))
    theta = torch.as_tensor(theta, dtype=torch.float64)
    P = torch.softmax(-theta[:, None, None] * D, dim=2)  # (m, y, λ)
    return (P * D).sum(2).mean(1)
