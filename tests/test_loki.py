"""shammie.loki: dense, graph and embedding metrics against brute-force float64; Loki's predict,
locus and next_class; expected squared distance; bad input; WordNet (skipped without wordnet-base
and timm's synset lists)."""

import numpy as np
import pytest

nx = pytest.importorskip("networkx")
pytest.importorskip("scipy")
import scipy.sparse  # noqa: E402
import torch  # noqa: E402

from shammie.loki import (DenseMetric, EmbeddingMetric, GraphMetric, Loki, TreeMetric,  # noqa: E402
                          expected_squared_distance, wordnet)
from tests.conftest import DTYPES  # noqa: E402
from tests.test_tree_frechet import check_topk, nx_distances, random_tree  # noqa: E402


def random_graph(n, seed):
    g = nx.connected_watts_strogatz_graph(n, 4, 0.3, seed=seed)
    rng = np.random.default_rng(seed)
    for u, v in g.edges:
        g[u][v]["weight"] = float(rng.uniform(0.5, 2.0))
    d = np.array([[nx.dijkstra_path_length(g, s, t) for t in range(n)] for s in range(n)])
    return g, d


def metrics(n=40, seed=0):
    """(name, metric, squared distances (N, N) in float64) for each kind of metric."""
    rng = np.random.default_rng(seed)
    pts = rng.normal(size=(n, 5))
    dense = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + rng.uniform(0, 1, (n, n))
    dense = (dense + dense.T) / 2
    np.fill_diagonal(dense, 0)
    g, gd = random_graph(n, seed)
    parent, weight = random_tree(n, seed, True)
    emb = rng.normal(size=(n, 6))
    sq_emb = ((emb[:, None] - emb[None]) ** 2).sum(-1)
    return [("dense", DenseMetric(torch.from_numpy(dense)), dense ** 2),
            ("graph", GraphMetric(nx.to_scipy_sparse_array(g, nodelist=range(n))), gd ** 2),
            ("tree", TreeMetric(parent, weight), nx_distances(parent, weight, np.arange(n)) ** 2),
            ("embedding", EmbeddingMetric(torch.from_numpy(emb)), sq_emb)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3])
def test_metrics_against_brute_force(dtype, k):
    observed = torch.tensor([3, 17, 8, 30, 22])
    for name, metric, sq in metrics():
        probs = torch.softmax(torch.randn(19, 5, dtype=torch.float64) * 2, 1).to(dtype)
        values, indices = metric.frechet_topk(probs, observed, k)
        # the embedding metric's fused form rounds differently in half precision: compare values loosely
        if name == "embedding" and dtype in (torch.float16, torch.bfloat16):
            scale = float(np.abs(sq).max())
            ref = np.sort(probs.double().numpy() @ sq[observed.numpy()], axis=1)[:, :k]
            assert np.abs(values.double().numpy() - ref).max() <= 0.05 * scale, name
            continue
        check_topk(values, indices, probs, sq[observed.numpy()], k, None, dtype)


def test_metrics_with_candidates():
    observed = torch.tensor([1, 2, 5, 9])
    mask = torch.zeros(40, dtype=torch.bool)
    mask[torch.arange(0, 40, 3)] = True
    for name, metric, sq in metrics(seed=1):
        probs = torch.rand(8, 4, dtype=torch.float64)
        for cands in (mask, torch.nonzero(mask).flatten()):
            values, indices = metric.frechet_topk(probs, observed, 2, cands)
            check_topk(values, indices, probs, sq[observed.numpy()], 2, mask.numpy(), torch.float64)


def test_graph_edge_list_and_partial_dense():
    g, d = random_graph(30, 4)
    edges = np.array([[u, v, g[u][v]["weight"]] for u, v in g.edges])
    metric = GraphMetric(edges, num_nodes=30)
    observed = torch.tensor([0, 4, 29])
    probs = torch.rand(6, 3, dtype=torch.float64)
    check_topk(*metric.frechet_topk(probs, observed, 2), probs, d[observed.numpy()] ** 2, 2, None, torch.float64)
    partial = DenseMetric(torch.from_numpy(d[:10]))  # rows for labels 0..9 only
    check_topk(*partial.frechet_topk(probs, torch.tensor([0, 4, 9]), 2), probs, d[[0, 4, 9]] ** 2, 2, None,
               torch.float64)
    with pytest.raises(ValueError, match="no row"):
        partial.frechet_topk(probs, observed, 1)


def test_loki_predict_beats_argmax_on_near_misses():
    parent, weight = random_tree(300, 21, False)
    metric = TreeMetric(parent, weight)
    rng = np.random.default_rng(0)
    observed = torch.from_numpy(rng.choice(300, 40, replace=False))
    loki = Loki(metric, observed)
    # A calibrated near-miss classifier: p ∝ exp(−d(c, λ)²/8) around a hidden class c, and the
    # target drawn from p, so the Fréchet mean minimizes each sample's expected squared distance.
    gen = torch.Generator().manual_seed(0)
    sq = metric.sq_dists(observed)[:, observed.numpy()]  # (K, K)
    centre = torch.randint(0, 40, (2000,), generator=gen)
    probs = torch.softmax(-sq[centre].float() / 8, dim=1)
    target = observed[torch.multinomial(probs, 1, generator=gen)[:, 0]]
    pred = loki.predict(probs)
    assert pred.shape == (2000,) and loki.predict(probs, k=3).shape == (2000, 3)
    argmax = observed[probs.argmax(1)]
    assert expected_squared_distance(pred, target, metric) < expected_squared_distance(argmax, target, metric)


def test_expected_squared_distance():
    parent, weight = random_tree(50, 2, True)
    metric = TreeMetric(parent, weight)
    d = nx_distances(parent, weight, np.arange(50))
    a, b = torch.randint(0, 50, (30,)), torch.randint(0, 50, (30,))
    assert expected_squared_distance(a, b, metric) == pytest.approx((d[a.numpy(), b.numpy()] ** 2).mean())
    for _, m, sq in metrics():
        assert expected_squared_distance(a[:5] % 40, b[:5] % 40, m) == pytest.approx(sq[a[:5] % 40, b[:5] % 40].mean())


def test_tree_locus_is_the_union_of_paths_and_matches_the_exact_lp():
    parent, weight = random_tree(45, 6, True)
    metric = TreeMetric(parent, weight)
    observed = torch.tensor([3, 11, 29, 40])
    g = nx.Graph([(int(u), v) for v, u in enumerate(parent) if u >= 0])
    paths = set()
    for i in observed.tolist():
        for j in observed.tolist():
            paths.update(nx.shortest_path(g, i, j))
    locus = Loki(metric, observed).locus()
    assert sorted(locus.tolist()) == sorted(paths)
    # the generic locus (one LP per label) on the same distances agrees
    dense = DenseMetric(torch.from_numpy(nx_distances(parent, weight, np.arange(45))))
    assert sorted(Loki(dense, observed).locus().tolist()) == sorted(paths)


def test_next_class_is_farthest_from_the_locus():
    parent, weight = random_tree(60, 8, True)
    metric = TreeMetric(parent, weight)
    d = nx_distances(parent, weight, np.arange(60))
    observed = torch.tensor([5, 20, 33])
    loki = Loki(metric, observed)
    far = d[:, loki.locus().numpy()].min(1)
    assert far[loki.next_class()] == pytest.approx(far.max())
    assert far[Loki(DenseMetric(torch.from_numpy(d)), observed).next_class()] == pytest.approx(far.max())
    emb = EmbeddingMetric(torch.randn(30, 3, dtype=torch.float64))
    assert 0 <= Loki(emb, torch.tensor([0, 1, 2])).next_class() < 30


def test_bad_input():
    parent, weight = random_tree(20, 1, True)
    metric = TreeMetric(parent, weight)
    observed = torch.tensor([1, 2, 3])
    good = torch.rand(4, 3)
    with pytest.raises(ValueError, match="non-negative"):
        metric.frechet_topk(good - 2, observed)
    with pytest.raises(ValueError, match="finite"):
        metric.frechet_topk(torch.where(good > 0.5, float("nan"), good), observed)
    with pytest.raises(ValueError, match="K mismatch"):
        metric.frechet_topk(torch.rand(4, 5), observed)
    with pytest.raises(ValueError, match="positive sum"):
        metric.frechet_topk(torch.zeros(4, 3), observed)
    with pytest.raises(ValueError, match="out of range"):
        metric.frechet_topk(good, torch.tensor([1, 2, 20]))
    with pytest.raises(ValueError, match="out of range"):
        Loki(metric, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="exceeds the number of candidates"):
        metric.frechet_topk(good, observed, k=3, candidates=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="exceeds the number of candidates"):
        DenseMetric(torch.rand(20, 20)).frechet_topk(good, observed, k=21)
    with pytest.raises(ValueError, match="cycle"):
        TreeMetric(np.array([-1, 2, 3, 1]))
    with pytest.raises(ValueError, match="no root"):
        TreeMetric(np.array([1, 2, 0]))
    with pytest.raises(ValueError, match="2 roots"):
        TreeMetric(np.array([-1, 0, -1, 2]))
    with pytest.raises(ValueError, match="non-negative edge"):
        TreeMetric(np.array([-1, 0]), np.array([0.0, -1.0]))
    with pytest.raises(ValueError, match="disconnected"):
        GraphMetric(scipy.sparse.csr_matrix(np.eye(3, k=1)[[0, 2, 2]])).frechet_topk(torch.rand(2, 1), torch.tensor([0]))


needs_wordnet = pytest.mark.skipif(not wordnet.available(),
                                   reason="needs wordnet-base (apt) and timm's synset lists (pip install --no-deps timm)")


@needs_wordnet
def test_wordnet_tree_and_imagenet():
    tree = wordnet.load_noun_tree()
    assert 80_000 < tree.offsets.shape[0] < 85_000
    assert tree.names[int(np.flatnonzero(tree.parent == -1)[0])] == "entity"
    n1k = tree.nodes_of(wordnet.imagenet_wnids("1k"))
    assert n1k.shape == (1000,)
    metric = TreeMetric(tree.parent)
    observed = torch.from_numpy(n1k)
    probs = torch.softmax(torch.randn(5, 1000) * 4, 1).double()
    values, indices = metric.frechet_topk(probs, observed, 2)
    cand = torch.from_numpy(np.union1d(tree.nodes_of(wordnet.imagenet_wnids("21k")), n1k))
    sq = metric.sq_dists(observed).numpy()
    check_topk(values, indices, probs, sq, 2, None, torch.float64)
    mask = np.zeros(metric.num_labels, dtype=bool)
    mask[cand.numpy()] = True
    values, indices = metric.frechet_topk(probs.float(), observed, 1, cand)
    check_topk(values, indices, probs.float(), sq, 1, mask, torch.float32)
