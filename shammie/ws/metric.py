"""Finite metric label spaces for weak supervision: the Kendall-tau ranking metric (a Loki metric), the
pseudo-Euclidean embedding d² = ‖u₊−v₊‖² − ‖u₋−v₋‖², and the weighted Fréchet-mean search
argmin_y Σ_j w_j·d²(j, y) through a metric's frechet_topk (shammie.frechet_topk underneath).

A metric is a shammie.loki metric (DenseMetric, TreeMetric, GraphMetric, EmbeddingMetric,
RankingMetric) or any object with the same interface:
- ``num_labels``: the size N of the label space (labels are ids 0..N-1);
- ``sq_dists(rows)``: the (len(rows), N) squared distances from label ids ``rows`` to every label;
- ``frechet_topk(weights, observed, k=1, candidates=None) -> (values, indices)``;
- optionally ``distance(a, b)``: elementwise d(a[i], b[i]), used when a (K, K) block would be too big.
A plain (N, N) tensor of squared distances is accepted wherever a metric is (as a DenseMetric).
"""

from __future__ import annotations

import itertools
import math
import numbers

import torch

from shammie.loki import _search
from shammie.loki.metrics import DenseMetric, Metric

__all__ = ["RankingMetric", "as_metric", "frechet_search", "pseudo_euclidean_embedding", "sq_block"]

# Elements of a (rows, N) block of squared distances fetched at once.
_BLOCK_ELEMS = 1 << 24


def as_metric(metric):
    """The metric itself, or an (N, N) tensor of squared distances as a Loki DenseMetric."""
    if isinstance(metric, torch.Tensor):
        if metric.dim() != 2 or metric.shape[0] != metric.shape[1]:
            raise ValueError(f"metric: expected a square (N, N) matrix of squared distances, got shape "
                             f"{tuple(metric.shape)}")
        return DenseMetric(metric if metric.is_floating_point() else metric.double(), squared=True)
    if not (hasattr(metric, "sq_dists") and hasattr(metric, "num_labels")):
        raise TypeError(f"metric: expected a shammie.loki metric (num_labels, sq_dists(rows), frechet_topk) or an "
                        f"(N, N) tensor of squared distances; got {type(metric).__name__}")
    return metric


def sq_block(metric, rows=None, cols=None, device=None, dtype=torch.float64) -> torch.Tensor:
    """Squared distances between label ids rows × cols (None: all labels), fetched in row blocks."""
    N = int(metric.num_labels)
    rows = torch.arange(N) if rows is None else torch.as_tensor(rows).long().flatten()
    cols_cpu = None if cols is None else torch.as_tensor(cols).long().flatten()
    step = max(1, _BLOCK_ELEMS // max(1, N))
    out = []
    for s in range(0, max(1, rows.numel()), step):
        r = rows[s:s + step]
        if r.numel() == 0:
            break
        block = metric.sq_dists(r.to(_device_of(metric)))
        if cols_cpu is not None:
            block = block.index_select(1, cols_cpu.to(block.device))
        out.append(block.to(device=device, dtype=dtype))
    if not out:
        return torch.zeros(0, N if cols is None else cols_cpu.numel(), device=device, dtype=dtype)
    return torch.cat(out)


def _device_of(metric):
    for name in ("sq", "emb", "_signs"):
        t = getattr(metric, name, None)
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def frechet_search(metric, weights, observed, k=1, candidates=None):
    """argmin_y Σ_j weights[:, j]·d²(observed[j], y) over the label space (or candidates), k smallest.

    weights: (B, K) float, non-negative, each row with a positive sum; observed: (K,) int64 label ids;
    candidates: None, a bool mask (N,) or an int64 id tensor. Returns (values (B, k), label ids (B, k)
    int64), ascending, ties to the lowest id: the metric's frechet_topk (Loki; shammie.frechet_topk).
    """
    if hasattr(metric, "frechet_topk"):
        return metric.frechet_topk(weights, observed, k, candidates)
    mask = _search.candidate_mask(candidates, int(metric.num_labels))
    return _search.frechet_topk(weights, sq_block(metric, observed, None, weights.device, weights.dtype), k, mask)


class RankingMetric(Metric):
    """Permutations of n_items with the Kendall tau distance (number of discordant item pairs).

    Label id i is the i-th permutation in lexicographic order (``itertools.permutations``), a
    permutation listing item ids from first to last place. d(π, σ) = (P − ⟨s_π, s_σ⟩)/2 with
    s_π ∈ {±1}^P the pairwise order signs over the P = n(n−1)/2 item pairs, so every block of squared
    distances is one matmul. The label space is enumerated exactly (n_items ≤ 8, N = n_items! ≤ 40320).
    The Fréchet search never forms the (K, N) block: 4·Σ_j w_j·d²(j, y) = (P² + P)·Σw − 2P·⟨Σ_j w_j s_j, s_y⟩
    + 2·Σ_{p<q} (Σ_j w_j s_jp s_jq)·s_yp s_yq, one GEMM + top-k (shammie.gemm_bias_topk) against fixed
    features of y with P(P+1)/2 columns (406 for 8 items).
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
        self._pq = torch.triu_indices(self.num_pairs, self.num_pairs, 1, device=device)
        self._features = {}

    def _pair_products(self, S: torch.Tensor) -> torch.Tensor:
        """(…, P) signs -> (…, P + P(P−1)/2): the signs, then s_p·s_q for p < q."""
        pq = self._pq.to(S.device)
        return torch.cat([S, S[:, pq[0]] * S[:, pq[1]]], 1)

    def _search(self, probs, observed, k, mask):
        P = self.num_pairs
        acc = torch.float64 if probs.dtype == torch.float64 else torch.float32
        key = (probs.device, probs.dtype)
        if key not in self._features:  # (D, N) features of every ranking, built once per device and dtype
            self._features[key] = self._pair_products(self._signs.to(probs.device, acc)).T.contiguous().to(probs.dtype)
        w = probs.to(acc)
        F = self._pair_products(self._signs[observed.to(self._signs.device)].to(probs.device, acc))  # (K, D)
        x = w @ F
        x[:, :P] *= -2.0 * P
        x[:, P:] *= 2.0
        feats = self._features[key]
        bias = torch.zeros(feats.shape[1], device=probs.device, dtype=probs.dtype)
        values, indices = _search.gemm_bias_topk(x.to(probs.dtype), feats, bias, k, mask)
        const = (P * P + P) * w.sum(1, keepdim=True)
        return ((values.to(acc) + const) * 0.25).to(probs.dtype), indices

    def _ids(self, ids, name: str) -> torch.Tensor:
        """Integer label ids in [0, N) as int64 on the metric's device (negative ids would wrap)."""
        ids = torch.as_tensor(ids, device=self._signs.device)
        if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{name}: expected integer label ids, got {ids.dtype}")
        ids = ids.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_labels):
            raise ValueError(f"{name}: expected label ids in [0, {self.num_labels - 1}], got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return ids

    def ids_to_perms(self, ids: torch.Tensor) -> torch.Tensor:
        """(…) label ids -> (…, n_items) permutations."""
        device = ids.device if isinstance(ids, torch.Tensor) else None
        return self.perms[self._ids(ids, "ids")].to(device)

    def perms_to_ids(self, perms: torch.Tensor) -> torch.Tensor:
        """(…, n_items) permutations -> (…) label ids (lexicographic rank, by the Lehmer code)."""
        n = self.n_items
        perms = torch.as_tensor(perms)
        if perms.dtype.is_floating_point or perms.is_complex() or perms.dtype == torch.bool:
            raise TypeError(f"perms: expected integer item ids, got {perms.dtype}")
        perms = perms.long()
        if perms.dim() == 0 or perms.shape[-1] != n:
            raise ValueError(f"perms: expected shape (…, {n}) (n_items = {n}), got {tuple(perms.shape)}")
        # a permutation of 0..n-1 holds each item once: sorting each row gives 0..n-1
        if perms.numel() and not bool((perms.sort(-1).values == torch.arange(n, device=perms.device)).all()):
            raise ValueError(f"perms: expected permutations of the items 0..{n - 1} (each item once)")
        smaller_after = (perms.unsqueeze(-1) > perms.unsqueeze(-2)).triu(1).sum(-1)  # (…, n)
        fact = torch.tensor([math.factorial(n - 1 - i) for i in range(n)], device=perms.device)
        return (smaller_after * fact).sum(-1)

    def dists(self, rows=None, cols=None) -> torch.Tensor:
        """Kendall tau distances between label ids (None: all)."""
        S = self._signs
        A = S if rows is None else S[self._ids(rows, "rows")]
        B = S if cols is None else S[self._ids(cols, "cols")]
        return (self.num_pairs - A @ B.T) * 0.5

    def sq_dists(self, rows) -> torch.Tensor:
        """(len(rows), N) squared Kendall distances (the Loki metric interface)."""
        return self.dists(rows, None).square()

    def distance(self, a, b) -> torch.Tensor:
        """Elementwise Kendall distance d(a[i], b[i]) for equal-shaped id tensors (float64)."""
        S = self._signs
        a, b = self._ids(a, "a"), self._ids(b, "b")
        return ((self.num_pairs - (S[a] * S[b]).sum(-1)) * 0.5).double()


def pseudo_euclidean_embedding(sq_dists: torch.Tensor, dims: int | None = None, anchor: int | None = 0,
                               tol: float = 1e-9):
    """Isometric embedding of a finite metric: d²(i, j) = ‖u₊ᵢ−u₊ⱼ‖² − ‖u₋ᵢ−u₋ⱼ‖².

    B = ½(D₀ᵢ + D₀ⱼ − Dᵢⱼ) is the Gram matrix anchored at point ``anchor`` (default 0) or, when anchor is
    None, at the centroid (B = −½ J D J with J = I − 11ᵀ/N: same distances, centred coordinates). With
    B = V Λ Vᵀ, X = V |Λ|^½; columns with λ > 0 form the positive part, λ < 0 the negative part.
    dims keeps the dims largest |λ|. Eigenvalues with |λ| ≤ tol·max|λ| are dropped.
    Returns (X (N, r), signs (r,) of ±1 in X's dtype): d² = ((Xᵢ−Xⱼ)² · signs).sum().
    """
    if sq_dists.dim() != 2 or sq_dists.shape[0] != sq_dists.shape[1]:
        raise ValueError(f"sq_dists: expected a square (N, N) matrix, got shape {tuple(sq_dists.shape)}")
    if not bool(torch.isfinite(sq_dists).all()):
        raise ValueError("sq_dists: expected finite squared distances (found NaN or inf)")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, numbers.Integral) or dims < 1):
        raise ValueError(f"dims: expected None or an int >= 1, got {dims!r}")
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
