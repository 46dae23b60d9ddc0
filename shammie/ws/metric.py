"""Finite metric label spaces for weak supervision: the metric protocol the label models use, the
Kendall-tau ranking metric, the pseudo-Euclidean embedding d² = ‖u₊−v₊‖² − ‖u₋−v₋‖², and the weighted
Fréchet-mean search argmin_y Σ_j w_j·d²(j, y) (on shammie.frechet_topk / a metric's own search).

A metric is any object with
- ``num_labels``: the size N of the label space (labels are ids 0..N-1);
- ``sq_dists(rows=None, cols=None)``: the (len(rows), len(cols)) matrix of squared distances between
  label ids (None: all labels).
It may also have ``frechet_topk(weights, observed, k=1, candidates=None) -> (values, indices)`` (the
Loki metrics do); otherwise the search runs on ``shammie.frechet_topk`` over ``sq_dists(observed)``.
A plain (N, N) tensor of squared distances is accepted wherever a metric is.
"""

from __future__ import annotations

import itertools
import math

import torch

__all__ = ["RankingMetric", "as_metric", "frechet_search", "pseudo_euclidean_embedding"]

# Rows of weights searched at once by the torch fallback ((rows, N) scores held at once).
_SEARCH_ELEMS = 1 << 24


class _TensorMetric:
    """Adapter: a dense (N, N) tensor of squared distances seen through the metric protocol."""

    def __init__(self, sq_dists: torch.Tensor):
        if sq_dists.dim() != 2 or sq_dists.shape[0] != sq_dists.shape[1]:
            raise ValueError(f"sq_dists: expected a square (N, N) matrix, got shape {tuple(sq_dists.shape)}")
        if not sq_dists.is_floating_point():
            raise TypeError(f"sq_dists: expected a floating dtype, got {sq_dists.dtype}")
        self.D = sq_dists
        self.num_labels = sq_dists.shape[0]

    def sq_dists(self, rows=None, cols=None):
        D = self.D
        if rows is not None:
            D = D.index_select(0, torch.as_tensor(rows, device=D.device).long())
        if cols is not None:
            D = D.index_select(1, torch.as_tensor(cols, device=D.device).long())
        return D


def as_metric(metric):
    """The metric itself, or a tensor of squared distances wrapped in the metric protocol."""
    if isinstance(metric, torch.Tensor):
        return _TensorMetric(metric)
    if not hasattr(metric, "sq_dists"):
        raise TypeError(f"metric: expected an object with sq_dists(rows, cols) and num_labels, or an (N, N) "
                        f"tensor of squared distances; got {type(metric).__name__}")
    return metric


def num_labels(metric) -> int:
    """N of a metric in the protocol (or a Loki metric that names it differently)."""
    for name in ("num_labels", "n", "num_points"):
        if hasattr(metric, name):
            return int(getattr(metric, name))
    return int(metric.sq_dists(None, None).shape[0])


def _torch_frechet_topk(weights, sq_dists, k, candidates):
    """Reference search: scores = weights @ sq_dists, k smallest per row, ascending, ties to lowest id."""
    cand = None
    if candidates is not None:
        cand = candidates.nonzero().flatten() if candidates.dtype == torch.bool else candidates.long()
        sq_dists = sq_dists.index_select(1, cand)
    rows = max(1, _SEARCH_ELEMS // max(1, sq_dists.shape[1]))
    vals, idx = [], []
    for s in range(0, weights.shape[0], rows):
        scores = weights[s:s + rows] @ sq_dists
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        vals.append(scores.gather(1, order))
        idx.append(order)
    values = torch.cat(vals) if vals else weights.new_zeros(0, k)
    indices = torch.cat(idx) if idx else torch.zeros(0, k, dtype=torch.long, device=weights.device)
    if cand is not None:
        indices = cand[indices]
    return values, indices


def frechet_search(metric, weights, observed, k=1, candidates=None):
    """argmin_y Σ_j weights[:, j]·d²(observed[j], y) over the label space (or candidates), k smallest.

    weights: (B, K) float; observed: (K,) int64 label ids; candidates: None, a bool mask (N,) or an
    int64 id tensor. Returns (values (B, k), label ids (B, k) int64), ascending, ties to the lowest id.
    Uses the metric's own search when it has one, else shammie.frechet_topk, else a torch fallback.
    """
    if hasattr(metric, "frechet_topk"):
        return metric.frechet_topk(weights, observed, k=k, candidates=candidates)
    D = metric.sq_dists(observed, None).to(device=weights.device, dtype=weights.dtype)
    import shammie

    if hasattr(shammie, "frechet_topk"):
        return shammie.frechet_topk(weights, D, k=k, candidates=candidates)
    return _torch_frechet_topk(weights, D, k, candidates)


class RankingMetric:
    """Permutations of n_items with the Kendall tau distance (number of discordant item pairs).

    Label id i is the i-th permutation in lexicographic order (``itertools.permutations``), a
    permutation listing item ids from first to last place. d(π, σ) = (P − ⟨s_π, s_σ⟩)/2 with
    s_π ∈ {±1}^P the pairwise order signs over the P = n(n−1)/2 item pairs, so every block of squared
    distances is one matmul. The label space is enumerated exactly (n_items ≤ 8, N = n_items! ≤ 40320).
    """

    def __init__(self, n_items: int, device=None, dtype=torch.float32):
        if not 2 <= n_items <= 8:
            raise ValueError(f"n_items: expected 2 <= n_items <= 8 (exact enumeration of n_items! rankings), "
                             f"got {n_items}")
        self.n_items = n_items
        self.num_labels = math.factorial(n_items)
        self.dtype = dtype
        self.perms = torch.tensor(list(itertools.permutations(range(n_items))), dtype=torch.long, device=device)
        iu = torch.triu_indices(n_items, n_items, 1, device=device)
        pos = torch.argsort(self.perms, dim=1)  # pos[p, item] = place of item in permutation p
        self._signs = torch.sign(pos[:, iu[1]] - pos[:, iu[0]]).to(dtype)  # (N, P)
        self.num_pairs = iu.shape[1]

    def ids_to_perms(self, ids: torch.Tensor) -> torch.Tensor:
        """(…) label ids -> (…, n_items) permutations."""
        return self.perms.to(ids.device)[ids.long()]

    def perms_to_ids(self, perms: torch.Tensor) -> torch.Tensor:
        """(…, n_items) permutations -> (…) label ids (lexicographic rank, by the Lehmer code)."""
        n = self.n_items
        perms = perms.long()
        smaller_after = (perms.unsqueeze(-1) > perms.unsqueeze(-2)).triu(1).sum(-1)  # (…, n)
        fact = torch.tensor([math.factorial(n - 1 - i) for i in range(n)], device=perms.device)
        return (smaller_after * fact).sum(-1)

    def dists(self, rows=None, cols=None) -> torch.Tensor:
        """Kendall tau distances between label ids (None: all)."""
        S = self._signs
        A = S if rows is None else S[torch.as_tensor(rows, device=S.device).long()]
        B = S if cols is None else S[torch.as_tensor(cols, device=S.device).long()]
        return (self.num_pairs - A @ B.T) * 0.5

    def sq_dists(self, rows=None, cols=None) -> torch.Tensor:
        return self.dists(rows, cols).square()

    def sq_dist_pairs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Elementwise d²(x[i], y[i]) for equal-shaped id tensors."""
        S = self._signs.to(x.device)
        d = (self.num_pairs - (S[x.long()] * S[y.long()]).sum(-1)) * 0.5
        return d.square()


def pseudo_euclidean_embedding(sq_dists: torch.Tensor, dims: int | None = None, anchor: int | None = None,
                               tol: float = 1e-9):
    """Isometric embedding of a finite metric: d²(i, j) = ‖u₊ᵢ−u₊ⱼ‖² − ‖u₋ᵢ−u₋ⱼ‖².

    B = ½(D₀ᵢ + D₀ⱼ − Dᵢⱼ) is the Gram matrix anchored at point 0 (``anchor``) or, when anchor is None,
    at the centroid (B = −½ J D J with J = I − 11ᵀ/N: same distances, centred coordinates). With
    B = V Λ Vᵀ, X = V |Λ|^½; columns with λ > 0 form the positive part, λ < 0 the negative part.
    dims keeps the dims largest |λ|. Eigenvalues with |λ| ≤ tol·max|λ| are dropped.
    Returns (X (N, r), signs (r,) of ±1 in X's dtype): d² = ((Xᵢ−Xⱼ)² · signs).sum().
    """
    if sq_dists.dim() != 2 or sq_dists.shape[0] != sq_dists.shape[1]:
        raise ValueError(f"sq_dists: expected a square (N, N) matrix, got shape {tuple(sq_dists.shape)}")
    D = sq_dists.double()
    N = D.shape[0]
    if anchor is None:
        J = torch.eye(N, dtype=D.dtype, device=D.device) - 1.0 / N
        B = -0.5 * J @ D @ J
    else:
        if not 0 <= anchor < N:
            raise ValueError(f"anchor: expected 0 <= anchor < {N}, got {anchor}")
        B = 0.5 * (D[anchor].unsqueeze(1) + D[anchor].unsqueeze(0) - D)
    lam, V = torch.linalg.eigh(0.5 * (B + B.T))
    order = torch.argsort(lam.abs(), descending=True)
    lam, V = lam[order], V[:, order]
    keep = lam.abs() > tol * lam.abs().max().clamp_min(1e-300)
    if dims is not None:
        keep &= torch.arange(N, device=D.device) < dims
    lam, V = lam[keep], V[:, keep]
    X = V * lam.abs().sqrt()
    return X.to(sq_dists.dtype), torch.sign(lam).to(sq_dists.dtype)
