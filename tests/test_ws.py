"""shammie.ws: θ recovery from synthetic LFs with known θ (tree, rankings, a line), pseudolabels against
majority vote and the true-θ oracle, the Kendall metric, the pseudo-Euclidean embedding, the Gaussian
label model, and the robustness fallbacks."""

import itertools

import pytest
import torch

from shammie.ws import (ContinuousLabelModel, MetricLabelModel, RankingMetric, expected_sq_dists, majority_vote,
                        pseudo_euclidean_embedding, sample_lfs, sq_block)


def tree_sq_dists(branching=3, depth=3):
    """Squared path lengths between the leaves of a complete tree (leaf id = its base-b digits)."""
    N = branching ** depth
    i = torch.arange(N)
    digits = torch.stack([(i // branching ** (depth - 1 - k)) % branching for k in range(depth)], 1)
    common = (digits[:, None, :] == digits[None, :, :]).long().cumprod(2).sum(2)
    return (2.0 * (depth - common)) ** 2


def line_sq_dists(N=21):
    x = torch.arange(N, dtype=torch.float32)
    return (x[:, None] - x[None, :]) ** 2


SPACES = {
    "tree": (tree_sq_dists, [0.3, 0.2, 0.1, 0.15, 0.05, 0.25]),
    "ranking": (lambda: RankingMetric(5), [0.3, 0.2, 0.1, 0.15, 0.05]),
    "line": (line_sq_dists, [0.05, 0.1, 0.02, 0.2, 0.08]),
}


def space(name):
    """(metric, true θ) of one of SPACES."""
    make, theta = SPACES[name]
    return make(), torch.tensor(theta)


def sq_err(metric, a, b):
    D = metric if isinstance(metric, torch.Tensor) else sq_block(metric)
    return D[a, b].mean().item()


@pytest.mark.parametrize("name", SPACES)
def test_theta_error_falls_with_n(name):
    metric, theta = space(name)
    g = torch.Generator().manual_seed(0)
    errs = []
    for n in (100, 1000, 10000):
        L, _ = sample_lfs(metric, theta, n, abstain=0.2, generator=g)
        lm = MetricLabelModel(metric, identity="model").fit(L)
        errs.append(((lm.accuracies() - theta).abs() / theta).mean().item())
    assert errs[2] < errs[0] and errs[2] < 0.06, errs


@pytest.mark.parametrize("identity", ["additive", "inner", "model"])
@pytest.mark.parametrize("name", SPACES)
def test_pseudolabels_beat_majority_vote_near_oracle(name, identity):
    metric, theta = space(name)
    L, y = sample_lfs(metric, theta, 4000, abstain=0.1, generator=torch.Generator().manual_seed(1))
    covered = (L >= 0).any(1)
    L, y = L[covered], y[covered]
    lm = MetricLabelModel(metric, identity=identity).fit(L)
    ours = sq_err(metric, lm.predict(L), y)
    oracle = sq_err(metric, MetricLabelModel(metric).set_accuracies(theta).predict(L), y)
    mv = sq_err(metric, majority_vote(L, lm.num_labels), y)
    assert ours < 0.6 * mv, (ours, mv)
    assert ours < 1.15 * oracle, (ours, oracle)


def test_estimates_close_for_each_identity():
    metric, theta = tree_sq_dists(), torch.tensor(SPACES["tree"][1])
    L, _ = sample_lfs(metric, theta, 10000, generator=torch.Generator().manual_seed(2))
    true = expected_sq_dists(metric, theta)
    for identity, tol in (("additive", 0.35), ("inner", 0.25), ("model", 0.05)):
        for aggregate in ("median", "mean"):
            lm = MetricLabelModel(metric, identity=identity, aggregate=aggregate).fit(L)
            rel = ((lm.expected_sq_dists_.double() - true).abs() / true).mean().item()
            assert rel < tol, (identity, aggregate, rel)


def test_predict_searches_whole_space_topk_and_candidates():
    D = line_sq_dists(11)
    lm = MetricLabelModel(D).set_accuracies(torch.ones(3))
    L = torch.tensor([[0, 4, 8], [2, 2, -1], [-1, -1, -1]])
    ids, vals = lm.predict(L, return_values=True)
    assert ids.tolist() == [4, 2, -1]  # the mean of 0, 4, 8; all-abstain -> -1
    assert vals[0].item() == pytest.approx(32.0) and torch.isnan(vals[2])
    L2 = torch.tensor([[0, 3, 3]])
    assert lm.predict(L2).tolist() == [2]  # argmin of d²(0,y)+2d²(3,y) is y = 2, not any vote
    top = lm.predict(L2, k=3)
    assert top.tolist() == [[2, 1, 3]]  # f(1) = f(3) = 9: the tie goes to the lower id
    cand = torch.zeros(11, dtype=torch.bool)
    cand[[5, 9]] = True
    assert lm.predict(L2, candidates=cand).tolist() == [5]
    assert lm.predict(L2, candidates=torch.tensor([9, 5])).tolist() == [5]


def test_predict_proba_is_the_posterior():
    D = tree_sq_dists(2, 2)
    theta = torch.tensor([0.5, 0.2, 0.7])
    lm = MetricLabelModel(D).set_accuracies(theta)
    L = torch.tensor([[0, 3, -1], [-1, -1, -1]])
    p = lm.predict_proba(L)
    e = -(theta[0] * D[0] + theta[1] * D[3])
    torch.testing.assert_close(p[0], torch.softmax(e, 0))
    torch.testing.assert_close(p[1], torch.full((4,), 0.25))
    pc = lm.predict_proba(L, candidates=torch.tensor([3, 1]))
    torch.testing.assert_close(pc[0], torch.softmax(e[[3, 1]], 0))


def test_ranking_metric_is_kendall_tau():
    R = RankingMetric(4)
    perms = list(itertools.permutations(range(4)))
    assert R.num_labels == 24
    ref = torch.tensor([[sum((p.index(a) < p.index(b)) != (q.index(a) < q.index(b))
                             for a, b in itertools.combinations(range(4), 2)) for q in perms] for p in perms],
                       dtype=torch.float32)
    torch.testing.assert_close(R.dists(), ref)
    torch.testing.assert_close(R.sq_dists(torch.tensor([1, 5])), ref[[1, 5]] ** 2)
    ids = torch.arange(24)
    assert torch.equal(R.perms_to_ids(R.ids_to_perms(ids)), ids)
    torch.testing.assert_close(R.distance(ids, ids.flip(0)), ref[ids, ids.flip(0)].double())
    with pytest.raises(ValueError, match="n_items"):
        RankingMetric(9)


@pytest.mark.parametrize("anchor", [None, 0, 3])
def test_pseudo_euclidean_embedding_is_isometric(anchor):
    g = torch.Generator().manual_seed(3)
    D = sq_block(RankingMetric(4))  # squared Kendall: not Euclidean, needs a negative part
    D2 = torch.rand(9, 9, generator=g, dtype=torch.float64)
    D2 = (D2 + D2.T).fill_diagonal_(0)
    for M in (D, D2, tree_sq_dists(2, 3).double()):
        X, s = pseudo_euclidean_embedding(M, anchor=anchor)
        rec = ((X[:, None, :] - X[None, :, :]) ** 2 * s).sum(-1)
        torch.testing.assert_close(rec, M, atol=1e-8, rtol=1e-8)
    X, s = pseudo_euclidean_embedding(D2)
    assert (s < 0).any() and (s > 0).any()
    Xk, sk = pseudo_euclidean_embedding(D2, dims=3)
    assert Xk.shape == (9, 3) and sk.shape == (3,)


def test_continuous_label_model():
    g = torch.Generator().manual_seed(4)
    n, sig = 20000, torch.tensor([0.5, 1.0, 2.0, 0.8])
    y = 3.0 + 2.0 * torch.randn(n, generator=g, dtype=torch.float64)
    L = y[:, None] + sig * torch.randn(n, 4, generator=g, dtype=torch.float64)
    L[torch.rand(n, 4, generator=g) < 0.2] = float("nan")
    lm = ContinuousLabelModel(y_var=4.0).fit(L)
    torch.testing.assert_close(lm.cov_, torch.full((4,), 4.0, dtype=torch.float64), atol=0.15, rtol=0)
    rho = 2.0 / (4.0 + sig ** 2).sqrt()
    torch.testing.assert_close(lm.accuracies().double(), rho.double(), atol=0.02, rtol=0)
    pred = lm.predict(L).double()
    # the oracle: precision-weighted mean of the votes with the prior
    prec = torch.where(torch.isfinite(L), 1 / sig ** 2, torch.zeros(1, dtype=torch.float64))
    oracle = (3.0 / 4.0 + (torch.nan_to_num(L) * prec).sum(1)) / (1 / 4.0 + prec.sum(1))
    mse, mse_oracle = ((pred - y) ** 2).mean(), ((oracle - y) ** 2).mean()
    mean_vote = torch.nanmean(L, 1)
    ok = torch.isfinite(mean_vote)
    assert mse < 1.03 * mse_oracle and mse < ((mean_vote[ok] - y[ok]) ** 2).mean()
    all_abstain = torch.full((1, 4), float("nan"), dtype=torch.float64)
    assert lm.predict(all_abstain).item() == pytest.approx(lm.mu_y_)


def test_robustness_errors_and_fallbacks():
    D = tree_sq_dists(2, 2)
    theta = torch.tensor([0.5, 0.4, 0.3, 0.6])
    L, _ = sample_lfs(D, theta, 500, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="at least 3 labeling functions"):
        MetricLabelModel(D).fit(L[:, :2])
    bad = L.clone()
    bad[0, 0] = 4
    with pytest.raises(ValueError, match=r"label ids must be in \[0, 3\]"):
        MetricLabelModel(D).fit(bad)
    bad[0, 0] = -2
    with pytest.raises(ValueError, match="-1 for abstain"):
        MetricLabelModel(D).fit(bad)
    with pytest.raises(TypeError, match="integer dtype"):
        MetricLabelModel(D).fit(L.float())
    silent = L.clone()
    silent[:, 1] = -1
    with pytest.warns(UserWarning, match="never vote"):
        lm = MetricLabelModel(D).fit(silent)
    assert lm.accuracies()[1] == 0 and (lm.accuracies()[[0, 2, 3]] > 0).all()
    two = L.clone()
    two[:, 1:3] = -1
    with pytest.raises(ValueError, match="only 2 of 4 vote"):
        MetricLabelModel(D).fit(two)
    disjoint = L.clone()
    disjoint[:250, 3] = -1
    disjoint[250:, :3] = -1  # LF 3 never co-votes with the others
    with pytest.warns(UserWarning, match="no usable triplet"):
        lm = MetricLabelModel(D).fit(disjoint)
    assert torch.isfinite(lm.accuracies()).all()
    lm = MetricLabelModel(D).fit(L)
    L2 = L[:3].clone()
    L2[1] = -1
    assert lm.predict(L2)[1] == -1
    with pytest.raises(ValueError, match="expected 4 labeling functions"):
        lm.predict(L[:, :3])
    with pytest.raises(RuntimeError, match="call fit"):
        MetricLabelModel(D).predict(L)
    with pytest.raises(ValueError, match="square"):
        MetricLabelModel(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="identity"):
        MetricLabelModel(D, identity="bogus")
    with pytest.raises(ValueError, match="at least 3"):
        ContinuousLabelModel(1.0).fit(torch.zeros(10, 2))
    with pytest.raises(ValueError, match="y_var"):
        ContinuousLabelModel(0.0)


def test_predict_proba_checks_candidates_like_predict():
    """A wrong-length mask, float ids and out-of-range ids are errors naming candidates (they were a bogus
    (n, 1) distribution, silently truncated ids and a raw index RuntimeError); a valid mask still works."""
    D = line_sq_dists(5)
    lm = MetricLabelModel(D).set_accuracies(torch.ones(3))
    L = torch.tensor([[0, 1, 1], [2, 2, 3]])
    for bad in (torch.tensor([True, False]), torch.tensor([1.5, 2.0]), torch.tensor([1, 7]), torch.tensor([-1, 2]),
                torch.zeros(5, dtype=torch.bool)):
        with pytest.raises(ValueError, match="candidates"):
            lm.predict_proba(L, candidates=bad)
        with pytest.raises(ValueError, match="candidates"):
            lm.predict(L, candidates=bad)
    mask = torch.tensor([False, True, False, True, False])
    full = lm.predict_proba(L)
    torch.testing.assert_close(lm.predict_proba(L, candidates=mask), full[:, [1, 3]] / full[:, [1, 3]].sum(1, True))
    torch.testing.assert_close(lm.predict_proba(L, candidates=[3, 1]), lm.predict_proba(L, candidates=mask).flip(1))


def test_one_class_label_space_fits_and_predicts():
    """N = 1 (every distance 0): fit no longer divides by a zero scale in the model rule; θ stays the additive
    estimate (any θ is the same model), E d² = 0, and the only label is predicted."""
    L = torch.zeros(4, 3, dtype=torch.long)
    for identity in ("additive", "auto"):  # auto (the model rule, last) is the one that crashed
        lm = MetricLabelModel(torch.zeros(1, 1), identity=identity).fit(L)
        assert torch.isfinite(lm.accuracies()).all() and (lm.accuracies() > 0).all()
        assert lm.predict(L).tolist() == [0, 0, 0, 0]
    assert lm.expected_sq_dists_.tolist() == [0.0, 0.0, 0.0]
    assert lm.predict_proba(L[:1]).tolist() == [[1.0]]
    # all labels at distance 0 (no scale to clip E d² by): finite θ, not 1/0
    zero = MetricLabelModel(torch.zeros(3, 3)).fit(torch.tensor([[0, 1, 2], [0, 0, 0], [2, 1, 0]]))
    assert torch.isfinite(zero.accuracies()).all()


def test_clip_must_be_a_pair():
    D = line_sq_dists(3)
    for clip in ((1.0,), (1e-3, 1.0, 2.0), (1.0, 0.5), 0.5):
        with pytest.raises(ValueError, match="clip"):
            MetricLabelModel(D, clip=clip)
    assert MetricLabelModel(D, clip=[1e-2, 1.0]).clip == [1e-2, 1.0]


def test_ranking_ids_are_checked():
    """Non-permutations (were id 0) and ids outside [0, N) (negative ones wrapped) are errors."""
    R = RankingMetric(3)
    for perm in ([0, 0, 1], [5, 6, 7], [[0, 1, 2], [2, 2, 2]]):
        with pytest.raises(ValueError, match="perms: expected permutations"):
            R.perms_to_ids(torch.tensor(perm))
    with pytest.raises(ValueError, match=r"perms: expected shape \(…, 3\)"):
        R.perms_to_ids(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"rows: expected label ids in \[0, 5\]"):
        R.dists(rows=[-1])
    with pytest.raises(ValueError, match="cols"):
        R.dists(cols=torch.tensor([6]))
    with pytest.raises(ValueError, match="a: expected label ids"):
        R.distance(torch.tensor([-1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="ids: expected label ids"):
        R.ids_to_perms(torch.tensor([6]))
    assert R.perms_to_ids(R.perms.view(2, 3, 3)).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert R.distance(torch.tensor([0, 1]), torch.tensor([5, 1])).tolist() == [3.0, 0.0]


def test_pseudo_euclidean_embedding_checks_input():
    """NaN distances gave an empty (N, 0) embedding and dims=-1 kept nothing; both are errors now."""
    D = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    nan = torch.tensor([[0.0, float("nan")], [float("nan"), 0.0]])
    with pytest.raises(ValueError, match="sq_dists: expected finite"):
        pseudo_euclidean_embedding(nan)
    for dims in (-1, 0, 1.5):
        with pytest.raises(ValueError, match="dims"):
            pseudo_euclidean_embedding(D, dims=dims)
    assert pseudo_euclidean_embedding(D, dims=1)[0].shape == (2, 1)


def test_default_rule_is_the_consistent_one_where_it_fits():
    """identity="auto": the model rule up to 1024 labels (its error falls with n), additive above."""
    assert MetricLabelModel(RankingMetric(5)).identity == "model"       # 120 rankings
    assert MetricLabelModel(RankingMetric(7)).identity == "additive"    # 5,040 rankings
    assert MetricLabelModel(1.0 - torch.eye(3), identity="inner").identity == "inner"


def test_fit_on_exact_moments_of_binary_case():
    """Binary classes (d² = 1 off the diagonal): the additive and inner rules are exact in the population."""
    D = 1.0 - torch.eye(2)
    theta = torch.tensor([1.5, 0.8, 2.2, 1.0])
    L, y = sample_lfs(D, theta, 50000, generator=torch.Generator().manual_seed(6))
    true = expected_sq_dists(D, theta).float()
    for identity in ("inner", "model"):
        lm = MetricLabelModel(D, identity=identity).fit(L)
        torch.testing.assert_close(lm.expected_sq_dists_, true, atol=0.01, rtol=0)


def test_every_loki_metric_gives_the_same_model():
    """Dense, tree, graph and embedding metrics of one label space give the same θ and pseudolabels."""
    from shammie.loki import DenseMetric, EmbeddingMetric, GraphMetric, TreeMetric

    # a complete ternary tree of depth 2 (13 nodes; every node is a label), its edges as a graph
    parent = torch.tensor([-1, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    tree = TreeMetric(parent)
    edges = torch.stack([torch.arange(1, 13), parent[1:]], 1)
    graph = GraphMetric(edges.numpy(), num_nodes=13)
    D = sq_block(tree)
    line = torch.arange(13, dtype=torch.float64)[:, None]
    theta = torch.tensor([0.6, 0.4, 0.2, 0.5])
    L, y = sample_lfs(D, theta, 3000, abstain=0.1, generator=torch.Generator().manual_seed(8))
    ref = MetricLabelModel(D).fit(L)
    for metric in (tree, graph, DenseMetric(D, squared=True)):
        torch.testing.assert_close(sq_block(metric), D)
        lm = MetricLabelModel(metric).fit(L)
        torch.testing.assert_close(lm.accuracies(), ref.accuracies())
        assert torch.equal(lm.predict(L), ref.predict(L))
        # second places may tie (integer tree distances): compare the objective values
        torch.testing.assert_close(lm.predict(L, k=2, return_values=True)[1].float(),
                                   ref.predict(L, k=2, return_values=True)[1].float())
    emb = EmbeddingMetric(line)
    De = (line - line.T) ** 2
    Le, _ = sample_lfs(De, torch.tensor([0.3, 0.2, 0.1, 0.25]), 2000, generator=torch.Generator().manual_seed(9))
    a, b = MetricLabelModel(emb).fit(Le), MetricLabelModel(De).fit(Le)
    torch.testing.assert_close(a.accuracies(), b.accuracies())
    assert torch.equal(a.predict(Le), b.predict(Le))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ranking_search_matches_dense(dtype):
    """RankingMetric's GEMM search (no (K, N) block) against the dense search over its squared distances."""
    from shammie.loki import DenseMetric

    R = RankingMetric(5)
    dense = DenseMetric(sq_block(R).to(dtype), squared=True)
    g = torch.Generator().manual_seed(10)
    observed = torch.randperm(120, generator=g)[:17]
    w = torch.rand(64, 17, generator=g, dtype=dtype)
    w[:, 5:] *= torch.rand(64, 1, generator=g, dtype=dtype) < 0.5
    for cand in (None, torch.arange(120) % 3 == 0):
        v, i = R.frechet_topk(w, observed, 3, cand)
        vd, _ = dense.frechet_topk(w, observed, 3, cand)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(v, vd, rtol=tol, atol=tol)
        # each returned id's own objective equals its value
        own = (w @ sq_block(R, observed, None, dtype=dtype)).gather(1, i)
        torch.testing.assert_close(own, vd, rtol=tol, atol=tol)
        if cand is not None:
            assert bool(cand[i].all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("identity", ["additive", "inner", "model"])
@pytest.mark.parametrize("name", SPACES)
def test_cuda_label_matrix_gives_the_cpu_model(name, identity):
    # The label matrix on the GPU: fit, predict (the metric's search on CUDA) and predict_proba agree
    # with the CPU run.
    metric, theta = space(name)
    L, _ = sample_lfs(metric, theta, 2000, abstain=0.1, generator=torch.Generator().manual_seed(5))
    cpu = MetricLabelModel(metric, identity=identity).fit(L)
    gpu = MetricLabelModel(metric, identity=identity).fit(L.cuda())
    torch.testing.assert_close(gpu.accuracies().cpu(), cpu.accuracies(), rtol=1e-4, atol=1e-6)
    ids_cpu, vals_cpu = cpu.predict(L, k=2, return_values=True)
    ids_gpu, vals_gpu = gpu.predict(L.cuda(), k=2, return_values=True)
    torch.testing.assert_close(vals_gpu.cpu(), vals_cpu, rtol=1e-4, atol=1e-4, equal_nan=True)
    # Labels may differ only where two candidates score within rounding of each other.
    differ = ids_gpu.cpu() != ids_cpu
    assert differ.float().mean() < 0.01, differ.float().mean()
    cand = torch.arange(0, sq_block(metric).shape[0] if isinstance(metric, RankingMetric) else metric.shape[0], 2)
    torch.testing.assert_close(gpu.predict_proba(L[:50].cuda(), candidates=cand.cuda()).cpu(),
                               cpu.predict_proba(L[:50], candidates=cand), rtol=1e-4, atol=1e-6)
