"""Label-space metrics for Loki. Each computes the Fréchet top-k of a batch of probabilities over its
observed labels, f(y) = Σ_k p_k · d(y, λ_k)², with the cheapest exact search its structure allows:
  DenseMetric      a distance matrix: its K observed rows, squared, into shammie's dense search;
  TreeMetric       a rooted tree: shammie.tree_frechet_topk, O(|S|·k) per sample, no K×N matrix;
  GraphMetric      a weighted graph: scipy shortest paths for the K observed rows only, then dense;
  EmbeddingMetric  squared Euclidean distance: the nearest candidate to the p-weighted mean
                   embedding, one fused GEMM + bias + top-k with no K×N matrix.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import scipy.sparse
import scipy.sparse.csgraph
import torch

from shammie.loki import _search
from shammie.loki.tree import Tree
from shammie.tree_frechet import tree_frechet_topk

# Locus by linear programs (exact) up to this many labels; above it, by sampling (an inner approximation).
EXACT_LOCUS_MAX_LABELS = 2048


class Metric:
    """Common interface: num_labels, sq_dists(rows) (len(rows), N), distance(a, b), frechet_topk."""

    num_labels: int

    def sq_dists(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def distance(self, a, b) -> torch.Tensor:
        """d(a[i], b[i]) for label-id tensors a, b (float64)."""
        raise NotImplementedError

    def _search(self, probs, observed, k, mask):
        return _search.frechet_topk(probs, self.sq_dists(observed), k, mask)

    def frechet_topk(self, probs: torch.Tensor, observed, k: int = 1, candidates=None):
        """(values, indices), each (B, k): the k smallest f(y) over the candidate labels, ascending,
        ties to the lowest label id. probs (B, K) non-negative; observed (K,) label ids."""
        observed = _search.check_labels(observed, self.num_labels, "observed")
        probs = _search.check_probs(probs, observed.shape[0])
        mask = _search.candidate_mask(candidates, self.num_labels)
        _search.check_k(k, mask, self.num_labels)
        return self._search(probs, observed, k, mask)

    def locus(self, observed, candidates=None) -> torch.Tensor:
        """Label ids that are a Fréchet mean of the observed labels for some p in the simplex.
        Exact (one small LP per label) up to EXACT_LOCUS_MAX_LABELS labels; above, the union of the
        minimizers over the simplex's vertices, edge midpoints and Dirichlet samples (a subset)."""
        observed = _search.check_labels(observed, self.num_labels, "observed")
        mask = _search.candidate_mask(candidates, self.num_labels)
        cols = torch.arange(self.num_labels) if mask is None else torch.nonzero(mask).flatten()
        sq = self.sq_dists(observed).double().cpu()[:, cols].numpy()
        K, n = sq.shape
        if n <= EXACT_LOCUS_MAX_LABELS:
            keep = [j for j in range(n) if _in_locus(sq, j)]
            return cols[torch.tensor(keep, dtype=torch.long)]
        eye = torch.eye(K, dtype=torch.float64)
        pairs = torch.combinations(torch.arange(K), 2)[:4096]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            dirichlet = torch.distributions.Dirichlet(torch.ones(K, dtype=torch.float64)).sample((4096,))
        probs = torch.cat([eye, (eye[pairs[:, 0]] + eye[pairs[:, 1]]) / 2, dirichlet])
        _, idx = _search.frechet_topk(probs, torch.from_numpy(sq), 1, None)
        return cols[torch.unique(idx[:, 0])]

    def next_class(self, observed, candidates=None) -> int:
        """The label farthest from the locus (ties to the lowest id): the next class to observe."""
        loc = self.locus(observed, candidates)
        mask = _search.candidate_mask(candidates, self.num_labels)
        d = self.sq_dists(loc).double().cpu().min(dim=0).values
        if mask is not None:
            d = d.masked_fill(~mask, -1.0)
        return int(torch.argmax(d))


def _in_locus(sq: np.ndarray, j: int) -> bool:
    """Is there p ≥ 0, Σp = 1 with Σ_k p_k (sq[k, j] − sq[k, z]) ≤ 0 for every label z?"""
    K = sq.shape[0]
    diff = (sq[:, j:j + 1] - sq).T  # (n, K)
    res = scipy.optimize.linprog(np.zeros(K), A_ub=diff, b_ub=np.full(diff.shape[0], 1e-9),
                                 A_eq=np.ones((1, K)), b_eq=[1.0], bounds=(0, None), method="highs")
    return res.status == 0


class DenseMetric(Metric):
    """dist (R, N): distances from labels 0..R−1 (R ≤ N; R = N for a full matrix) to all N labels;
    squared=True if it already holds squared distances. Observed labels must be < R."""

    def __init__(self, dist, squared: bool = False):
        dist = torch.as_tensor(dist)
        if dist.dim() != 2 or dist.shape[0] > dist.shape[1] or not dist.is_floating_point():
            raise ValueError(f"dist must be a floating (R, N) matrix with R <= N, got {dist.dtype} of shape {tuple(dist.shape)}")
        if not bool(torch.isfinite(dist).all()) or bool((dist < 0).any()):
            raise ValueError("dist must hold finite, non-negative distances")
        self.sq = dist if squared else dist * dist
        self.num_labels = dist.shape[1]

    def _rows(self, rows):
        rows = torch.as_tensor(rows).long().cpu()
        if int(rows.max()) >= self.sq.shape[0]:
            raise ValueError(f"label {int(rows.max())} has no row in this partial distance matrix ({self.sq.shape[0]} rows)")
        return rows

    def sq_dists(self, rows):
        return self.sq[self._rows(rows).to(self.sq.device)]

    def distance(self, a, b):
        a = self._rows(a)
        return self.sq[a.to(self.sq.device), torch.as_tensor(b).long().to(self.sq.device)].double().sqrt().cpu()


class TreeMetric(Metric):
    """A rooted tree: parent (n,) with −1 at the root, weight (n,) the edge to each node's parent
    (default 1); labels (N,) the node of each label id (default: every node, label id = node id)."""

    def __init__(self, parent, weight=None, labels=None):
        self.tree = Tree(parent, weight)
        labels = np.arange(self.tree.n) if labels is None else np.asarray(torch.as_tensor(labels).cpu().numpy())
        if labels.ndim != 1 or labels.shape[0] == 0 or labels.min() < 0 or labels.max() >= self.tree.n:
            raise ValueError(f"labels must be a non-empty 1-D array of node ids in [0, {self.tree.n})")
        if np.unique(labels).shape[0] != labels.shape[0]:
            raise ValueError("labels must name distinct nodes")
        self.labels = labels.astype(np.int64)
        self.num_labels = labels.shape[0]
        self._plans = {}

    def plan(self, observed: torch.Tensor, mask, k: int, device) -> dict:
        key = (observed.numpy().tobytes(), None if mask is None else mask.numpy().tobytes(), k, str(device))
        if key not in self._plans:
            cand = np.arange(self.num_labels) if mask is None else np.flatnonzero(mask.numpy())
            plan = self.tree.plan(self.labels[observed.numpy()], self.labels[cand], cand, k)
            self._plans.clear()  # one observed set at a time is the common case; keep memory flat
            self._plans[key] = {name: torch.from_numpy(v).to(device) for name, v in plan.items()}
        return self._plans[key]

    def _search(self, probs, observed, k, mask):
        p = self.plan(observed.cpu(), mask, k, probs.device)
        return tree_frechet_topk(probs, p["parent"], p["edge"], p["depth"], p["obs_pos"], p["cand_t"],
                                 p["cand_label"], k)

    def sq_dists(self, rows, cols=None):
        """Squared distances (len(rows), N), or to the label ids cols only: the dense method's matrix."""
        rows = torch.as_tensor(rows).long().cpu().numpy()
        cols = self.labels if cols is None else self.labels[torch.as_tensor(cols).long().cpu().numpy()]
        return torch.from_numpy(self.tree.distances(self.labels[rows], cols) ** 2)

    def distance(self, a, b):
        a = self.labels[torch.as_tensor(a).long().cpu().numpy()]
        b = self.labels[torch.as_tensor(b).long().cpu().numpy()]
        return torch.from_numpy(self.tree.distance(a, b))

    def locus(self, observed, candidates=None):
        """Exact: the labels on the union of the paths between observed labels."""
        observed = _search.check_labels(observed, self.num_labels, "observed")
        on = self.tree.steiner(self.labels[observed.numpy()])[self.labels]
        mask = _search.candidate_mask(candidates, self.num_labels)
        if mask is not None:
            on &= mask.numpy()
        return torch.from_numpy(np.flatnonzero(on))

    def next_class(self, observed, candidates=None) -> int:
        observed = _search.check_labels(observed, self.num_labels, "observed")
        d = self.tree.distance_to_set(self.tree.steiner(self.labels[observed.numpy()]))[self.labels]
        mask = _search.candidate_mask(candidates, self.num_labels)
        if mask is not None:
            d = np.where(mask.numpy(), d, -1.0)
        return int(np.argmax(d))


class GraphMetric(Metric):
    """Shortest-path distance on an undirected graph: adjacency (N, N) scipy sparse (or dense) with edge
    lengths, or an edge list (E, 2) / (E, 3) [u, v, length] with num_nodes. Only the K observed rows
    are ever computed (scipy's Dijkstra), then searched densely."""

    def __init__(self, adjacency, num_nodes: int | None = None):
        if scipy.sparse.issparse(adjacency):
            graph = scipy.sparse.csr_matrix(adjacency, dtype=np.float64)
        else:
            arr = np.asarray(adjacency, dtype=np.float64)
            if arr.ndim == 2 and arr.shape[1] in (2, 3) and num_nodes is not None:
                w = arr[:, 2] if arr.shape[1] == 3 else np.ones(arr.shape[0])
                u, v = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64)
                if arr.shape[0] and (min(u.min(), v.min()) < 0 or max(u.max(), v.max()) >= num_nodes):
                    raise ValueError(f"edge list names a node outside [0, {num_nodes})")
                graph = scipy.sparse.csr_matrix((w, (u, v)), shape=(num_nodes, num_nodes))
            elif arr.ndim == 2 and arr.shape[0] == arr.shape[1]:
                graph = scipy.sparse.csr_matrix(arr)
            else:
                raise ValueError("adjacency must be a square (N, N) matrix, or an (E, 2)/(E, 3) edge list with num_nodes")
        if graph.shape[0] != graph.shape[1]:
            raise ValueError(f"adjacency must be square, got {graph.shape}")
        if graph.nnz and (not np.isfinite(graph.data).all() or (graph.data <= 0).any()):
            raise ValueError("edge lengths must be finite and positive")
        self.graph = graph
        self.num_labels = graph.shape[0]
        self._rows_cache = (None, None)

    def _dist_rows(self, rows):
        rows = torch.as_tensor(rows).long().cpu()
        key = rows.numpy().tobytes()
        if self._rows_cache[0] != key:
            d = scipy.sparse.csgraph.dijkstra(self.graph, directed=False, indices=rows.numpy())
            if not np.isfinite(d).all():
                raise ValueError("the graph is disconnected: some label is unreachable from an observed label")
            self._rows_cache = (key, torch.from_numpy(d))
        return self._rows_cache[1]

    def sq_dists(self, rows):
        return self._dist_rows(rows) ** 2

    def distance(self, a, b):
        a, b = torch.as_tensor(a).long().cpu(), torch.as_tensor(b).long().cpu()
        uniq, inv = torch.unique(a, return_inverse=True)
        d = scipy.sparse.csgraph.dijkstra(self.graph, directed=False, indices=uniq.numpy())
        return torch.from_numpy(d[inv.numpy(), b.numpy()])


class EmbeddingMetric(Metric):
    """d(y, z) = ||e_y − e_z|| for label embeddings emb (N, D). f(y) = P·||e_y||² − 2 e_y·m + c with
    m = Σ_k p_k e_{λ_k}, P = Σp, c = Σ_k p_k ||e_{λ_k}||², so the search is one GEMM + bias + top-k."""

    def __init__(self, emb):
        emb = torch.as_tensor(emb)
        if emb.dim() != 2 or not emb.is_floating_point():
            raise ValueError(f"emb must be a floating (N, D) matrix, got {emb.dtype} of shape {tuple(emb.shape)}")
        self.emb = emb
        self.num_labels = emb.shape[0]
        self._w = emb.t().contiguous()
        self._bias = (emb.double() ** 2).sum(dim=1).to(emb.dtype)

    def _search(self, probs, observed, k, mask):
        acc = torch.float64 if probs.dtype == torch.float64 else torch.float32
        p = probs.to(acc)
        obs = self.emb[observed.to(self.emb.device)].to(device=probs.device, dtype=acc)
        total = p.sum(dim=1, keepdim=True)
        x = (-2.0 / total) * (p @ obs)
        values, indices = _search.gemm_bias_topk(x.to(probs.dtype), self._w.to(device=probs.device, dtype=probs.dtype),
                                                 self._bias.to(device=probs.device, dtype=probs.dtype), k, mask)
        const = p @ (obs * obs).sum(dim=1)
        return (values.to(acc) * total + const[:, None]).to(probs.dtype), indices

    def sq_dists(self, rows):
        e = self.emb.double().cpu()
        return torch.cdist(e[torch.as_tensor(rows).long().cpu()], e, compute_mode="donot_use_mm_for_euclid_dist") ** 2

    def distance(self, a, b):
        e = self.emb.double().cpu()
        return (e[torch.as_tensor(a).long().cpu()] - e[torch.as_tensor(b).long().cpu()]).norm(dim=1)
