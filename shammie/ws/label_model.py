"""Label models for weak supervision over metric label spaces (Universalizing WS): each labeling function
(LF) a votes λ_a with p(λ_a | y) ∝ exp(−θ_a·d²(λ_a, y)); θ is learned without labels from LF–LF
agreements by the triplet method, and inference is the weighted Fréchet mean
ŷ = argmin_y Σ_a θ_a·d²(λ_a, y) = argmin_y Σ_j w_j·d²(j, y), w_j = Σ_{a: λ_a = j} θ_a.
ContinuousLabelModel is the Gaussian (regression) case: |Σ_ay| = sqrt(O_ab·O_ac·Var(y)/O_bc).
"""

from __future__ import annotations

import math
import warnings

import torch

from shammie.loki import _search
from shammie.ws.metric import as_metric, frechet_search, pseudo_euclidean_embedding, sq_block

__all__ = ["ContinuousLabelModel", "MetricLabelModel", "majority_vote"]

# Elements of (rows, m, m) or (rows, m, r) blocks held at once while reducing over rows.
_CHUNK_ELEMS = 1 << 22
# Largest label space embedded whole by identity="inner"; larger ones embed the observed labels only.
_EMBED_MAX = 2048
# Largest set of distinct observed labels whose (K, K) squared-distance block is materialized.
_DENSE_MAX = 4096
# Largest label space for identity="model" (it holds (m, N, N) model tables).
_MODEL_MAX = 1024


def _check_votes(L: torch.Tensor, n_labels: int, name: str = "L") -> torch.Tensor:
    if not isinstance(L, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of int64 label ids, got {type(L).__name__}")
    if L.dim() != 2:
        raise ValueError(f"{name}: expected shape (n, m) (rows × labeling functions), got {tuple(L.shape)}")
    if L.dtype.is_floating_point or L.dtype == torch.bool or L.is_complex():
        raise TypeError(f"{name}: expected an integer dtype (label ids, -1 = abstain), got {L.dtype}")
    L = L.long()
    if L.numel():
        lo, hi = int(L.min()), int(L.max())
        if lo < -1 or hi >= n_labels:
            raise ValueError(f"{name}: label ids must be in [0, {n_labels - 1}] (the metric's label space) or "
                             f"-1 for abstain; got values in [{lo}, {hi}]")
    return L


def _compact(L: torch.Tensor):
    """Observed label ids (K,) sorted, the votes as local indices into them (abstain -> 0), the vote mask."""
    M = L >= 0
    observed = torch.unique(L[M])
    local = torch.searchsorted(observed, L.clamp_min(0)).clamp_max(max(observed.numel() - 1, 0))
    return observed, local, M


def _row_chunks(n: int, per_row: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_row))
    return range(0, n, step), step


def _triplet_aggregate(T: torch.Tensor, how: str) -> torch.Tensor:
    """T (m, m, m): an estimate for LF a from each pair (b, c); NaN where invalid. Aggregated over (b, c)."""
    m = T.shape[0]
    i = torch.arange(m, device=T.device)
    distinct = (i[:, None, None] != i[None, :, None]) & (i[:, None, None] != i[None, None, :]) \
        & (i[None, :, None] < i[None, None, :])
    T = torch.where(distinct & torch.isfinite(T), T, torch.full_like(T, float("nan"))).reshape(m, m * m)
    if how == "median":
        return T.nanmedian(dim=1).values
    return T.nanmean(dim=1)


def majority_vote(L: torch.Tensor, n_labels: int | None = None) -> torch.Tensor:
    """The most frequent vote per row (ties to the lowest label id); -1 for rows where every LF abstains."""
    L = _check_votes(L, n_labels if n_labels is not None else int(L.max()) + 1 if L.numel() else 1)
    observed, local, M = _compact(L)
    counts = torch.zeros(L.shape[0], max(observed.numel(), 1), device=L.device)
    counts.scatter_add_(1, local, M.float())
    out = observed[counts.argmax(1)] if observed.numel() else torch.zeros_like(L[:, 0])
    return torch.where(M.any(1), out, torch.full_like(out, -1))


class MetricLabelModel:
    """Triplet-method label model over any finite metric label space.

    metric: a shammie.loki metric (Dense, Tree, Graph, Embedding), a RankingMetric, any object with their
    interface (``num_labels``, ``sq_dists(rows)``, ``frechet_topk``; see shammie.ws.metric),
    or an (N, N) tensor of squared distances.
    aggregate: "median" (default) or "mean" over the triplets (b, c) that estimate E d²(λ_a, y).
    identity: "auto" (default) is "model" for label spaces of at most 1024 labels, where it is consistent,
    and "additive" above (the "model" rule needs (m, N, N) tables there). Or one of:
    - "additive" (the triplet rule of Universalizing weak supervision): for conditionally independent
      LFs with mean-zero noise, E d²_ab = E d²_a + E d²_b, so E d²_a = (d_ab + d_ac − d_bc)/2. Biased on
      bounded spaces, where the noise is not mean-zero (its error does not fall with n).
    - "inner": embeds the label space (pseudo_euclidean_embedding, centred at its mean, y taken as
      uniform) and assumes E[φ(λ_a) | y] = α_a·φ(y); then O_ab = E⟨φ(λ_a), φ(λ_b)⟩ = β_a·β_b (β_a =
      α_a·√s, s = E‖φ(y)‖²), β_a² = O_ab·O_ac/O_bc, and E d²_a = E‖φ(λ_a)‖² − 2β_a√s + s. Exact for
      symmetric noise on distance-transitive spaces (classes, the binary case); usually less biased.
    - "model": consistent moment matching under the model itself (y uniform, label space of at most
      1024 labels): starting from the additive estimate, finds the θ whose predicted pairwise means
      E d²(λ_a, λ_b) = (1/N)·Σ_y Σ_ij p_a(i|y)·p_b(j|y)·d²(i, j) match the observed ones (least squares,
      LBFGS). Then θ_ is the model's θ itself (the MAP weights) and expected_sq_dists_ the model's E d².
    clip: E d²_a is clipped to [clip[0]·scale, clip[1]·scale], scale = the mean squared distance between
      two distinct observed labels; θ_a = 1/E d²_a then lies in a bounded range.
    min_overlap: LF pairs with fewer co-voting rows are treated as unknown.

    Fallbacks (documented, with a warning): an LF that never votes gets θ = 0 (ignored at inference); an
    LF in no usable triplet gets the median θ of the others. Fewer than 3 voting LFs raise ValueError.
    """

    def __init__(self, metric, aggregate: str = "median", identity: str = "auto",
                 clip: tuple[float, float] = (1e-3, 1.0), min_overlap: int = 1):
        if aggregate not in ("median", "mean"):
            raise ValueError(f"aggregate: expected 'median' or 'mean', got {aggregate!r}")
        if identity not in ("auto", "additive", "inner", "model"):
            raise ValueError(f"identity: expected 'auto', 'additive', 'inner' or 'model', got {identity!r}")
        if not (isinstance(clip, (tuple, list)) and len(clip) == 2 and 0 < clip[0] < clip[1]):
            raise ValueError(f"clip: expected a pair (lo, hi) with 0 < lo < hi, got {clip!r}")
        self.metric = as_metric(metric)
        self.num_labels = int(self.metric.num_labels)
        if identity == "auto":
            identity = "model" if self.num_labels <= _MODEL_MAX else "additive"
        self.aggregate, self.identity, self.clip, self.min_overlap = aggregate, identity, clip, min_overlap
        self.theta_ = None
        self.expected_sq_dists_ = None

    # -- estimation -----------------------------------------------------------------------------------
    def _sq(self, rows, cols, device, dtype):
        return sq_block(self.metric, rows, cols, device, dtype)

    def _pairwise_sq_means(self, L, observed, local, M, dtype):
        """S[a, b] = Σ over co-voting rows of d²(λ_a, λ_b), batched over row chunks."""
        n, m = L.shape
        S = torch.zeros(m, m, dtype=dtype, device=L.device)
        dense = observed.numel() <= _DENSE_MAX or not hasattr(self.metric, "distance")
        D = self._sq(observed, observed, L.device, dtype) if dense else None
        starts, step = _row_chunks(n, m * m)
        for s in starts:
            li, mi = local[s:s + step], M[s:s + step]
            both = (mi[:, :, None] & mi[:, None, :]).to(dtype)
            if dense:
                d2 = D[li[:, :, None], li[:, None, :]]
            else:
                ids = L[s:s + step].clamp_min(0)
                a, b = ids[:, :, None].expand(-1, m, m).flatten(), ids[:, None, :].expand(-1, m, m).flatten()
                d2 = self.metric.distance(a, b).to(device=L.device, dtype=dtype).square().view(-1, m, m)
            S += (d2 * both).sum(0)
        return S, D

    def _inner_moments(self, L, observed, local, M, dtype):
        """O[a, b] = mean over co-voting rows of ⟨φ(λ_a), φ(λ_b)⟩ (pseudo-Euclidean), and s = E‖φ(y)‖²."""
        n, m = L.shape
        N = self.num_labels
        if N <= _EMBED_MAX:
            D_all = self._sq(None, None, L.device, torch.float64)
            X, sg = pseudo_euclidean_embedding(D_all, anchor=None)
            Phi = X[observed]
            s = D_all.sum() / (2 * N * N)
        else:
            D_obs = self._sq(observed, observed, L.device, torch.float64)
            Phi, sg = pseudo_euclidean_embedding(D_obs, anchor=None)
            K = observed.numel()
            s = D_obs.sum() / (2 * K * K)
        Phi, sg = Phi.to(dtype), sg.to(dtype)
        G = torch.zeros(m, m, dtype=dtype, device=L.device)
        starts, step = _row_chunks(n, m * Phi.shape[1])
        for st in starts:
            X = Phi[local[st:st + step]] * M[st:st + step, :, None].to(dtype)  # (c, m, r)
            G += torch.einsum("nar,nbr->ab", X * sg, X)
        return G, float(s)

    def fit(self, L: torch.Tensor) -> "MetricLabelModel":
        """Estimate θ from the votes L (n, m) int64, -1 = abstain. Returns self."""
        L = _check_votes(L, self.num_labels)
        n, m = L.shape
        if m < 3:
            raise ValueError(f"L: the triplet method needs at least 3 labeling functions, got m = {m}")
        dtype = torch.float64
        observed, local, M = _compact(L)
        fires = M.sum(0)
        voting = fires > 0
        if int(voting.sum()) < 3:
            raise ValueError(f"L: the triplet method needs at least 3 labeling functions that vote; "
                             f"only {int(voting.sum())} of {m} vote on any row")
        if not bool(voting.all()):
            warnings.warn(f"labeling functions {voting.logical_not().nonzero().flatten().tolist()} never vote: "
                          f"their θ is set to 0 (ignored at inference)", stacklevel=2)
        Mf = M.to(dtype)
        C = Mf.T @ Mf
        unknown = C < max(1, self.min_overlap)
        if self.identity in ("additive", "model"):
            if self.identity == "model" and self.num_labels > _MODEL_MAX:
                raise ValueError(f"identity='model': label spaces of at most {_MODEL_MAX} labels "
                                 f"(this one has {self.num_labels}); use 'additive' or 'inner'")
            S, D = self._pairwise_sq_means(L, observed, local, M, dtype)
            P = torch.where(unknown, torch.full_like(S, float("nan")), S / C.clamp_min(1))
            T = 0.5 * (P[:, :, None] + P[:, None, :] - P[None, :, :])
            ed2 = _triplet_aggregate(T, self.aggregate)
        else:
            G, s = self._inner_moments(L, observed, local, M, dtype)
            O = torch.where(unknown, torch.full_like(G, float("nan")), G / C.clamp_min(1))
            T = O[:, :, None] * O[:, None, :] / O[None, :, :]
            T = torch.where(T > 0, T, torch.full_like(T, float("nan")))
            beta = _triplet_aggregate(T, self.aggregate).sqrt()
            q = O.diagonal()
            ed2 = q - 2 * beta * s ** 0.5 + s
            D = None
        scale = self._scale(observed, D, L.device, dtype)
        stuck = voting & ~torch.isfinite(ed2)
        ed2 = ed2.clamp(self.clip[0] * scale, self.clip[1] * scale)
        theta = torch.where(voting, 1.0 / ed2, torch.zeros_like(ed2))
        if bool(stuck.any()):
            fill = theta[voting & ~stuck].median() if bool((voting & ~stuck).any()) else 1.0 / scale
            warnings.warn(f"labeling functions {stuck.nonzero().flatten().tolist()} share no usable triplet "
                          f"(too little overlap with the others): their θ is set to the median of the others",
                          stacklevel=2)
            theta = torch.where(stuck, torch.as_tensor(fill, dtype=dtype, device=L.device), theta)
            ed2 = torch.where(stuck, 1.0 / theta, ed2)
        if self.identity == "model":
            theta, ed2 = self._match_moments(P, theta, voting, L.device)
        self.theta_ = theta.float()
        self.expected_sq_dists_ = torch.where(voting, ed2, torch.full_like(ed2, float("nan"))).float()
        return self

    def _match_moments(self, P, theta0, voting, device):
        """Least-squares fit of the model's pairwise E d²(λ_a, λ_b) to the observed means P (NaN = unknown)."""
        D = self._sq(None, None, device, torch.float64)
        N = D.shape[0]
        m = P.shape[0]
        use = torch.isfinite(P) & torch.ones(m, m, dtype=torch.bool, device=device).triu(1) \
            & voting[:, None] & voting[None, :]
        target = torch.where(use, P, torch.zeros_like(P))
        scale = float(D.mean())
        if not scale > 0:  # every distance is 0 (one label): the model ignores θ and E d² = 0; keep the estimate
            return theta0, torch.zeros_like(theta0)

        def model(theta):
            Pr = torch.softmax(-theta[:, None, None] * D, dim=2)  # (m, y, λ)
            E = torch.einsum("ayj,byj->ab", Pr @ D, Pr) / N
            return E, (Pr * D).sum(2).mean(1)

        def model_ed2(theta):
            return (torch.softmax(-theta[:, None, None] * D, dim=2) * D).sum(2).mean(1)

        # θ = exp(z) with z in [lo, hi] (a sigmoid keeps a saturated LF from running off), started where each
        # LF's model E d² equals its triplet estimate (a monotone 1-D inversion, by bisection)
        lo, hi = math.log(1e-3 / scale), math.log(1e3 / scale)
        ed2_0 = (1.0 / theta0).clamp(float(model_ed2(torch.full((1,), math.exp(hi), dtype=D.dtype, device=device))[0]),
                                     float(model_ed2(torch.full((1,), math.exp(lo), dtype=D.dtype, device=device))[0]))
        a, b = torch.full_like(ed2_0, lo), torch.full_like(ed2_0, hi)
        for _ in range(50):
            mid = 0.5 * (a + b)
            high = model_ed2(mid.exp()) > ed2_0  # E d² too high: θ must grow
            a, b = torch.where(high, mid, a), torch.where(high, b, mid)
        z0 = (0.5 * (a + b) - lo) / (hi - lo)
        z = torch.logit(z0.clamp(1e-6, 1 - 1e-6)).clone().requires_grad_(True)
        opt = torch.optim.LBFGS([z], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            E, _ = model((lo + (hi - lo) * torch.sigmoid(z)).exp())
            loss = (((E - target) / scale) ** 2 * use).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        theta = (lo + (hi - lo) * torch.sigmoid(z.detach())).exp()
        theta = torch.where(voting, theta, torch.zeros_like(theta))
        return theta, model(theta)[1]

    def _scale(self, observed, D, device, dtype):
        if D is None:
            sample = observed if observed.numel() <= _DENSE_MAX else observed[
                torch.randperm(observed.numel(), device=device)[:_DENSE_MAX]]
            D = self._sq(sample, sample, device, dtype)
        K = D.shape[0]
        scale = float(D.sum() / max(1, K * (K - 1))) if K > 1 else 0.0
        return scale if scale > 0 else 1.0  # one observed label, or all at distance 0: no scale to take

    def accuracies(self) -> torch.Tensor:
        """θ (m,): the estimated accuracy of each LF, 0 for LFs that never vote: the model's own θ_a in
        p(λ_a | y) ∝ exp(−θ_a·d²(λ_a, y)) under identity "model" (the default up to 1024 labels), else
        θ_a = 1/E d²(λ_a, y). E d² itself is in expected_sq_dists_."""
        self._check_fitted()
        return self.theta_

    def _check_fitted(self):
        if self.theta_ is None:
            raise RuntimeError("MetricLabelModel: call fit(L) (or set_accuracies) before accuracies/predict")

    def set_accuracies(self, theta: torch.Tensor) -> "MetricLabelModel":
        """Use given θ (m,) instead of fitted ones (e.g. the true θ, as an oracle)."""
        theta = torch.as_tensor(theta, dtype=torch.float32)
        if theta.dim() != 1 or not bool(torch.isfinite(theta).all()) or bool((theta < 0).any()):
            raise ValueError("theta: expected a 1-D tensor of finite, non-negative accuracies")
        self.theta_ = theta
        return self

    # -- inference ------------------------------------------------------------------------------------
    def _weights(self, L):
        L = _check_votes(L, self.num_labels)
        self._check_fitted()
        if L.shape[1] != self.theta_.numel():
            raise ValueError(f"L: expected {self.theta_.numel()} labeling functions (columns) as in fit, "
                             f"got {L.shape[1]}")
        observed, local, M = _compact(L)
        theta = self.theta_.to(L.device)
        W = torch.zeros(L.shape[0], max(observed.numel(), 1), device=L.device)
        W.scatter_add_(1, local, theta.expand_as(L) * M)
        if observed.numel() == 0:
            observed = torch.zeros(1, dtype=torch.long, device=L.device)
        return W, observed, (W > 0).any(1)

    def predict(self, L: torch.Tensor, k: int = 1, candidates=None, return_values: bool = False):
        """The weighted Fréchet mean of each row's votes over the whole label space (or candidates).

        Returns label ids (n,) for k = 1, else (n, k) (the k best, best first); with return_values, also
        the objective Σ_a θ_a·d²(λ_a, y). Rows with no (weighted) vote get -1 and NaN (documented fallback).
        """
        if k < 1:
            raise ValueError(f"k: expected k >= 1, got {k}")
        W, observed, has_vote = self._weights(L)
        ids = torch.full((W.shape[0], k), -1, dtype=torch.long, device=W.device)
        values = torch.full((W.shape[0], k), float("nan"), dtype=W.dtype, device=W.device)
        if bool(has_vote.any()):
            v, i = frechet_search(self.metric, W[has_vote], observed, k=k, candidates=candidates)
            ids[has_vote], values[has_vote] = i.to(W.device), v.to(W.dtype)
        if k == 1:
            ids, values = ids[:, 0], values[:, 0]
        return (ids, values) if return_values else ids

    def predict_proba(self, L: torch.Tensor, candidates=None) -> torch.Tensor:
        """p(y | votes) ∝ exp(−Σ_a θ_a·d²(λ_a, y)) over candidates: (n, C), columns in candidate order.

        candidates: int64 label ids or a bool mask over the label space; None means the whole label space
        (only for spaces of at most 4096 labels). Rows with no vote get the uniform distribution.
        """
        W, observed, _ = self._weights(L)
        if candidates is None:
            if self.num_labels > _DENSE_MAX:
                raise ValueError(f"candidates: required for label spaces over {_DENSE_MAX} labels "
                                 f"(this one has {self.num_labels})")
            cand = None
        else:
            # the same checks as predict (shape of a mask, integer ids in range); ids keep their order
            cand = torch.as_tensor(candidates)
            if cand.dtype == torch.bool:
                cand = _search.candidate_mask(cand, self.num_labels).nonzero().flatten()
                if cand.numel() == 0:
                    raise ValueError("candidates: the mask selects no label")
            else:
                cand = _search.check_labels(cand, self.num_labels, "candidates")
        D = self._sq(observed, cand, W.device, W.dtype)
        return torch.softmax(-(W @ D), dim=1)


class ContinuousLabelModel:
    """Gaussian label model for real-valued labels (regression).

    LFs λ = (λ_1..λ_m) and y are jointly Gaussian with LFs conditionally independent given y. With O the
    second moments of centred LF outputs (over co-voting rows), |Σ_ay| = sqrt(O_ab·O_ac·Var(y)/O_bc),
    aggregated over triplets (b, c); Σ_ay is taken positive (LFs positively correlated with y).
    The prediction is the conditional mean E[y | λ_obs] = μ_y + Σ_{y,obs} Σ_{obs,obs}⁻¹ (λ_obs − μ_obs),
    conditioning on each row's voting LFs (NaN = abstain). y_var is given by the user; y_mean defaults
    to the mean of the LF means (unbiased LFs). Rows with no vote get μ_y.
    """

    def __init__(self, y_var: float, y_mean: float | None = None, aggregate: str = "median", ridge: float = 1e-6):
        if not y_var > 0:
            raise ValueError(f"y_var: expected Var(y) > 0, got {y_var}")
        if aggregate not in ("median", "mean"):
            raise ValueError(f"aggregate: expected 'median' or 'mean', got {aggregate!r}")
        self.y_var, self.y_mean, self.aggregate, self.ridge = float(y_var), y_mean, aggregate, ridge
        self.cov_ = None

    @staticmethod
    def _check(L):
        if not isinstance(L, torch.Tensor) or L.dim() != 2 or not L.is_floating_point():
            raise ValueError("L: expected a floating (n, m) tensor of LF outputs (NaN = abstain)")
        if bool(torch.isinf(L).any()):
            raise ValueError("L: infinite LF outputs (use NaN for abstain)")
        return L.double()

    def fit(self, L: torch.Tensor) -> "ContinuousLabelModel":
        L = self._check(L)
        m = L.shape[1]
        if m < 3:
            raise ValueError(f"L: the triplet method needs at least 3 labeling functions, got m = {m}")
        M = torch.isfinite(L)
        Mf = M.double()
        fires = Mf.sum(0)
        if bool((fires < 2).any()):
            raise ValueError(f"L: labeling functions {(fires < 2).nonzero().flatten().tolist()} vote on fewer than 2 "
                             f"rows; drop them (their moments cannot be estimated)")
        mu = torch.where(M, L, torch.zeros_like(L)).sum(0) / fires
        Z = torch.where(M, L - mu, torch.zeros_like(L))
        C = Mf.T @ Mf
        O = torch.where(C > 1, (Z.T @ Z) / (C - 1).clamp_min(1), torch.full((m, m), float("nan"), dtype=L.dtype, device=L.device))
        T = O[:, :, None] * O[:, None, :] * self.y_var / O[None, :, :]
        T = torch.where(T > 0, T, torch.full_like(T, float("nan")))
        cov = _triplet_aggregate(T, self.aggregate).sqrt()
        if not bool(torch.isfinite(cov).all()):
            raise ValueError(f"L: labeling functions {(~torch.isfinite(cov)).nonzero().flatten().tolist()} share no "
                             f"positively correlated triplet with the others")
        self.mu_, self.cov_ = mu, cov
        self.O_ = torch.nan_to_num(O, nan=0.0)
        self.mu_y_ = float(mu.mean()) if self.y_mean is None else float(self.y_mean)
        return self

    def accuracies(self) -> torch.Tensor:
        """ρ_a = |Σ_ay| / sqrt(Var(λ_a)·Var(y)): each LF's estimated correlation with y."""
        if self.cov_ is None:
            raise RuntimeError("ContinuousLabelModel: call fit(L) first")
        return (self.cov_ / (self.O_.diagonal() * self.y_var).sqrt()).float()

    def predict(self, L: torch.Tensor) -> torch.Tensor:
        if self.cov_ is None:
            raise RuntimeError("ContinuousLabelModel: call fit(L) first")
        L = self._check(L)
        if L.shape[1] != self.cov_.numel():
            raise ValueError(f"L: expected {self.cov_.numel()} columns as in fit, got {L.shape[1]}")
        M = torch.isfinite(L)
        Mf = M.double()
        m = L.shape[1]
        O = self.O_ + self.ridge * self.O_.diagonal().mean() * torch.eye(m, dtype=L.dtype, device=L.device)
        A = Mf[:, :, None] * O * Mf[:, None, :] + torch.diag_embed(1 - Mf)
        z = torch.where(M, L - self.mu_, torch.zeros_like(L))
        x = torch.linalg.solve(A, z.unsqueeze(-1)).squeeze(-1)
        return (self.mu_y_ + (x * Mf) @ self.cov_).to(torch.float32)
