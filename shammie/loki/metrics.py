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
        ties to the lowest label id. probs (B, K) non-negative; observed (K,) label ids. Values come back
        in probs' dtype (searched in float32 for float16/bfloat16). A NaN score is never chosen: a row
        with fewer than k non-NaN scores (NaN distances or embeddings) ends in label −1, value NaN."""
        observed = _search.check_labels(observed, self.num_labels, "observed")
        probs = _search.check_probs(probs, observed.shape[0])
        mask = _search.candidate_mask(candidates, self.num_labels)
        _search.check_k(k, mask, self.num_labels)
        return self._search(probs, observed, k, mask)

    def locus(self, observed, candidates=None) -> torch.Tensor:
        """The candidate label ids (ascending) that are a Fréchet mean over the candidates for some p in
        the simplex: y with Σ_k p_k d(y, λ_k)² minimal among the candidates, ties included. Exact (one
        small LP per candidate) up to EXACT_LOCUS_MAX_LABELS candidates; above, the union of the
        minimizers over the simplex's vertices, edge midpoints and Dirichlet samples (a subset)."""
        observed = _search.check_labels(observed, self.num_labels, "observed")
        mask = _search.candidate_mask(candidates, self.num_labels)
        cols = torch.arange(self.num_labels) if mask is None else torch.nonzero(mask).flatten()
        return cols[_locus_among(self.sq_dists(observed).double().cpu()[:, cols].numpy())]

    def next_class(self, observed, candidates=None) -> int:
        """The candidate label farthest from the locus (ties to the lowest id): the next class to observe."""
        loc = self.locus(observed, candidates)
        mask = _search.candidate_mask(candidates, self.num_labels)
        d = self.sq_dists(loc).double().cpu().min(dim=0).values
        if mask is not None:
            d = d.masked_fill(~mask, -1.0)
        return int(torch.argmax(d))


def _locus_among(sq: np.ndarray, test: np.ndarray | None = None) -> torch.Tensor:
    """Positions of the columns of sq (K, n) that are a minimizer of p @ sq for some p in the simplex,
    among the positions test (default: all). One LP each up to EXACT_LOCUS_MAX_LABELS, else sampled."""
    K, n = sq.shape
    test = np.arange(n) if test is None else np.asarray(test, dtype=np.int64)
    if test.shape[0] <= EXACT_LOCUS_MAX_LABELS:
        return torch.tensor([j for j in test.tolist() if _in_locus(sq, j)], dtype=torch.long)
    eye = torch.eye(K, dtype=torch.float64)
    pairs = torch.combinations(torch.arange(K), 2)[:4096]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dirichlet = torch.distributions.Dirichlet(torch.ones(K, dtype=torch.float64)).sample((4096,))
    probs = torch.cat([eye, (eye[pairs[:, 0]] + eye[pairs[:, 1]]) / 2, dirichlet])
    _, idx = _search.frechet_topk(probs, torch.from_numpy(sq), 1, None)
    found = torch.unique(idx[:, 0])
    return found[torch.from_numpy(np.isin(found.numpy(), test))]


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
        # Squared in float32 at least: a float16 distance above 256 squares to inf.
        wide = dist if dist.dtype == torch.float64 else dist.float()
        self.sq = wide if squared else wide * wide
        self.num_labels = dist.shape[1]

    def _rows(self, rows):
        rows = torch.as_tensor(rows).long().cpu()
        if int(rows.max()) >= self.sq.shape[0]:
            raise ValueError(f"label {int(rows.max())} has no row in this partial distance matrix ({self.sq.shape[0]} rows)")
        return rows

    def sq_dists(self, rows):
        return self.sq[self._rows(rows).to(self.sq.device)]

    def distance(self, a, b):
        """d(a[i], b[i]). A partial matrix holds the rows of labels 0..R−1 only; d is symmetric, so a pair
        is read from b's row when a has none, whatever the order; a pair with neither label below R raises."""
        a, b = torch.as_tensor(a).long().cpu(), torch.as_tensor(b).long().cpu()
        R = self.sq.shape[0]
        row, col = torch.where(a < R, a, b), torch.where(a < R, b, a)
        if bool((row >= R).any()):
            i = int(torch.nonzero(row >= R)[0])
            raise ValueError(f"no distance between labels {int(a[i])} and {int(b[i])}: this partial distance matrix "
                             f"has rows for labels 0..{R - 1} only, and neither is one of them")
        return self.sq[row.to(self.sq.device), col.to(self.sq.device)].double().sqrt().cpu()


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
        """Exact, as Metric.locus: the candidate labels that are a Fréchet mean over the candidates for some p.
        Each candidate y meets the observed labels' spanning subtree S at one node a(y), at distance t(y),
        and d(y, λ) = t(y) + d(a(y), λ) for every observed λ: only the candidates nearest to S at their
        a(y) can be means. A node of S that is a candidate is one (it lies on a path between two
        observed labels and is the unique mean over all nodes of some p on the two), with the candidates
        at distance 0 from it (zero-length edges). So when every node of S is a candidate label (all
        labels by default, with every node a label) the locus costs linear time; otherwise one small LP
        per node of S that is not a candidate but has candidates hanging off it decides."""
        observed = _search.check_labels(observed, self.num_labels, "observed")
        mask = _search.candidate_mask(candidates, self.num_labels)
        cand = np.arange(self.num_labels) if mask is None else np.flatnonzero(mask.numpy())
        steiner = self.tree.steiner(self.labels[observed.numpy()])
        attach, t = self.tree.project(steiner)
        a, t = attach[self.labels[cand]], t[self.labels[cand]]
        is_cand = np.zeros(self.tree.n, dtype=bool)
        is_cand[self.labels[cand]] = True
        if is_cand[steiner].all():
            return torch.from_numpy(cand[t == 0])
        tmin = np.full(self.tree.n, np.inf)
        np.minimum.at(tmin, a, t)
        nearest = t <= tmin[a] * (1 + 1e-12)  # ties at one attachment node have equal distances to all λ
        order = np.lexsort((cand, t, a))
        first = order[np.r_[True, a[order][1:] != a[order][:-1]]]  # the nearest candidate at each node
        chosen = np.zeros(self.tree.n, dtype=bool)
        chosen[a[first]] = is_cand[a[first]]
        unsure = np.flatnonzero(~is_cand[a[first]])
        if unsure.shape[0]:
            keep = _locus_among(self.sq_dists(observed, cand[first]).numpy(), unsure).numpy()
            chosen[a[first][keep]] = True
        return torch.from_numpy(cand[nearest & chosen[a]])

    def next_class(self, observed, candidates=None) -> int:
        """The candidate label farthest from the locus (ties to the lowest id), as Metric.next_class."""
        on = np.zeros(self.tree.n, dtype=bool)
        on[self.labels[self.locus(observed, candidates).numpy()]] = True
        d = self.tree.distance_to_nodes(on)[self.labels]
        mask = _search.candidate_mask(candidates, self.num_labels)
        if mask is not None:
            d = np.where(mask.numpy(), d, -1.0)
        return int(np.argmax(d))


def _edge_graph(u, v, w, num_nodes: int, what: str):
    """Symmetric CSR adjacency from edges (u[i], v[i]) of length w[i]. Parallel edges (either direction)
    keep the shortest, as shortest paths would: a plain CSR build would add their lengths up."""
    if u.shape[0] and (min(u.min(), v.min()) < 0 or max(u.max(), v.max()) >= num_nodes):
        raise ValueError(f"{what} names a node outside [0, {num_nodes})")
    if not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f"{what}: edge lengths must be finite and positive")
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    order = np.lexsort((w, hi, lo))
    lo, hi, w = lo[order], hi[order], w[order]
    first = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])] if lo.shape[0] else np.zeros(0, dtype=bool)
    lo, hi, w = lo[first], hi[first], w[first]
    return scipy.sparse.csr_matrix((np.r_[w, w], (np.r_[lo, hi], np.r_[hi, lo])), shape=(num_nodes, num_nodes))


def _edge_list(edges, num_nodes):
    """The graph of an (E, 2) / (E, 3) edge list [u, v(, length)]; num_nodes defaults to max id + 1."""
    arr = np.asarray(edges, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise ValueError(f"edges must be an (E, 2) or (E, 3) array of [u, v] or [u, v, length], got shape {arr.shape}")
    ends = arr[:, :2]
    if not (np.isfinite(ends).all() and (ends == np.round(ends)).all()):
        raise ValueError("edges: the node ids (first two columns) must be integers")
    if num_nodes is None:
        if arr.shape[0] == 0:
            raise ValueError("edges is empty: pass num_nodes")
        num_nodes = int(ends.max()) + 1
    w = arr[:, 2] if arr.shape[1] == 3 else np.ones(arr.shape[0])
    return _edge_graph(ends[:, 0].astype(np.int64), ends[:, 1].astype(np.int64), w, int(num_nodes), "edges")


def _adjacency(adjacency, num_nodes):
    """The graph of an (N, N) adjacency matrix (scipy sparse or dense; a zero dense entry is no edge)."""
    if scipy.sparse.issparse(adjacency):
        coo = scipy.sparse.coo_matrix(adjacency)
    else:
        arr = np.asarray(adjacency, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"adjacency must be a square (N, N) matrix, got shape {arr.shape}")
        coo = scipy.sparse.coo_matrix(arr)
    if coo.shape[0] != coo.shape[1]:
        raise ValueError(f"adjacency must be a square (N, N) matrix, got shape {coo.shape}")
    if num_nodes is not None and num_nodes != coo.shape[0]:
        raise ValueError(f"num_nodes = {num_nodes} but adjacency is {coo.shape}")
    return _edge_graph(coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data.astype(np.float64),
                       coo.shape[0], "adjacency")


class GraphMetric(Metric):
    """Shortest-path distance on an undirected graph. Give it, by keyword, adjacency (N, N) (scipy sparse
    or dense; edge lengths, a zero dense entry is no edge) or edges (E, 2) / (E, 3) [u, v(, length)]
    (num_nodes defaults to the largest id + 1). Positionally, the shape decides: a scipy sparse or square
    (N, N) array is an adjacency, an (E, 2)/(E, 3) array an edge list; a (2, 2) or (3, 3) array is one
    only with num_nodes (an edge list) and otherwise raises, as it could be either. Parallel edges keep
    the shortest. Only the K observed rows are ever computed (scipy's Dijkstra), then searched densely."""

    def __init__(self, graph=None, num_nodes: int | None = None, *, adjacency=None, edges=None):
        given = [name for name, x in (("graph", graph), ("adjacency", adjacency), ("edges", edges)) if x is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of graph (positional), adjacency= or edges=, got {given or 'none'}")
        if edges is not None:
            graph = _edge_list(edges, num_nodes)
        elif adjacency is not None:
            graph = _adjacency(adjacency, num_nodes)
        elif scipy.sparse.issparse(graph):
            graph = _adjacency(graph, num_nodes)
        else:
            shape = np.shape(graph)
            is_edges = len(shape) == 2 and shape[1] in (2, 3)
            if is_edges and shape[0] == shape[1] and num_nodes is None:
                raise ValueError(f"graph: a {tuple(shape)} array could be an adjacency matrix or a list of {shape[0]} edges; "
                                 "pass it as adjacency=... or edges=... (or give num_nodes for an edge list)")
            graph = _edge_list(graph, num_nodes) if is_edges else _adjacency(graph, num_nodes)
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
    """d(y, z) = ||e_y − e_z|| for label embeddings emb (N, D). With c = e − mean(e) (f is translation
    invariant), f(y) = P·||c_y||² − 2 P c_y·m + C with m = Σ_k p_k c_{λ_k} / P, P = Σp and
    C = Σ_k p_k ||c_{λ_k}||², so the search is one GEMM + bias + top-k. Centring (once, the mean in
    float64) keeps the terms as small as the spread of the embeddings: with a large common offset they
    would cancel, and lose the minimum, in float16 and bfloat16 (and float32 far enough out)."""

    def __init__(self, emb):
        emb = torch.as_tensor(emb)
        if emb.dim() != 2 or not emb.is_floating_point():
            raise ValueError(f"emb must be a floating (N, D) matrix, got {emb.dtype} of shape {tuple(emb.shape)}")
        self.emb = emb
        self.num_labels = emb.shape[0]
        e = emb.double()
        finite = torch.isfinite(e).all(dim=1)  # a NaN or inf row must not spoil the mean of the others
        centre = e[finite].mean(dim=0) if bool(finite.any()) else torch.zeros_like(e[0])
        self._centred = (e - centre).to(emb.dtype)
        self._w = self._centred.t().contiguous()
        self._bias = (self._centred.double() ** 2).sum(dim=1).to(emb.dtype)

    def _search(self, probs, observed, k, mask):
        acc = torch.float64 if probs.dtype == torch.float64 else torch.float32
        p = probs.to(acc)
        obs = self._centred[observed.to(self.emb.device)].to(device=probs.device, dtype=acc)
        total = p.sum(dim=1, keepdim=True)
        x = (-2.0 / total) * (p @ obs)
        values, indices = _search.gemm_bias_topk(x.to(probs.dtype), self._w.to(device=probs.device, dtype=probs.dtype),
                                                 self._bias.to(device=probs.device, dtype=probs.dtype), k, mask)
        const = p @ (obs * obs).sum(dim=1)
        # f >= 0; rounding can leave a near-zero minimum slightly below
        return (values.to(acc) * total + const[:, None]).clamp_min(0).to(probs.dtype), indices

    def sq_dists(self, rows):
        e = self.emb.double().cpu()
        return torch.cdist(e[torch.as_tensor(rows).long().cpu()], e, compute_mode="donot_use_mm_for_euclid_dist") ** 2

    def distance(self, a, b):
        e = self.emb.double().cpu()
        return (e[torch.as_tensor(a).long().cpu()] - e[torch.as_tensor(b).long().cpu()]).norm(dim=1)
