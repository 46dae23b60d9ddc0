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


def _random_tree_case(rng, n):
    """A random weighted tree with labels on a random subset of its nodes (or all), random observed
    labels and a random candidate set: (TreeMetric, DenseMetric of the same distances, observed, cands)."""
    parent, weight = random_tree(n, int(rng.integers(1 << 30)), True)
    labels = np.sort(rng.choice(n, int(rng.integers(2, n + 1)), replace=False)) if rng.random() < 0.5 else np.arange(n)
    tree = TreeMetric(parent, weight, labels)
    N = labels.shape[0]
    dense = DenseMetric(torch.from_numpy(nx_distances(parent, weight, labels)))
    observed = torch.from_numpy(rng.choice(N, int(rng.integers(1, min(N, 5) + 1)), replace=False))
    cands = None if rng.random() < 0.3 else torch.from_numpy(rng.random(N) < 0.5) | (torch.arange(N) == N - 1)
    return tree, dense, observed, cands


def test_tree_locus_and_next_class_are_exact_over_candidates():
    # Labels on a subset of the nodes: root c = 0; a = 1, b = 2 at 1; d = 3 at 0.1; labels a, b, d.
    # The path a-b runs through c, not a label; d (label 2) is the mean of (a, b) for p = (.5, .5).
    tm = TreeMetric([-1, 0, 0, 0], weight=[0, 1, 1, 0.1], labels=[1, 2, 3])
    loki = Loki(tm, torch.tensor([0, 1]))
    assert loki.predict(torch.tensor([[0.5, 0.5]])).tolist() == [2]
    assert loki.locus().tolist() == [0, 1, 2]
    assert loki.next_class() == 0  # all at distance 0 from the locus: the lowest id
    # Candidates that leave out the path's interior: node 3 hangs off node 1 of the path 0-1-2.
    tm = TreeMetric([-1, 0, 1, 1], weight=[0, 1, 1, 0.1])
    assert Loki(tm, torch.tensor([0, 2]), candidates=torch.tensor([0, 2, 3])).locus().tolist() == [0, 2, 3]
    # Candidates off the observed labels' subtree altogether: predict answers 3, so 3 is in the locus.
    loki = Loki(tm, torch.tensor([0, 2]), candidates=torch.tensor([3]))
    assert loki.predict(torch.tensor([[0.5, 0.5]])).tolist() == [3] and loki.locus().tolist() == [3]
    assert loki.next_class() == 3
    # Random trees against the generic locus (one LP per candidate) on the same distances.
    rng = np.random.default_rng(3)
    for _ in range(30):
        tree, dense, observed, cands = _random_tree_case(rng, int(rng.integers(2, 25)))
        assert Loki(tree, observed, cands).locus().tolist() == Loki(dense, observed, cands).locus().tolist()
        assert Loki(tree, observed, cands).next_class() == Loki(dense, observed, cands).next_class()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_embedding_metric_with_a_large_common_offset(dtype):
    # f is translation invariant; ||e_y||² − 2 e_y·m + ... cancelled when every embedding sat near one
    # far point (unnormalized word/CLIP embeddings), in fp32 too at this offset.
    gen = torch.Generator().manual_seed(0)
    D, K, B = 8, 6, 64
    offset = 1000.0 if dtype == torch.float32 else 100.0
    spread = 0.01 if dtype == torch.float32 else 1.0
    emb = (torch.randn(300, D, generator=gen, dtype=torch.float64) * spread + offset).to(dtype)
    observed = torch.randperm(300, generator=gen)[:K]
    probs = torch.softmax(torch.randn(B, K, generator=gen) * 2, 1).to(dtype)
    e = emb.double()  # the brute force in float64 on the embeddings as stored
    sq = torch.cdist(e[observed], e, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    f = probs.double() @ sq
    values, indices = Loki(EmbeddingMetric(emb), observed).frechet_topk(probs, 1)
    got, best = f.gather(1, indices)[:, 0], f.min(1).values
    if dtype == torch.float32:
        assert torch.equal(indices[:, 0], f.argmin(1))
        torch.testing.assert_close(values[:, 0].double(), best, rtol=1e-3, atol=1e-3 * spread ** 2)
    else:
        # half precision keeps ~3 digits of the centred terms: a near-tie may flip, by much less than the spread
        scale = D * spread ** 2
        assert (got - best).max() <= 0.02 * scale
        assert (values[:, 0].double() - got).abs().max() <= 0.05 * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_and_graph_search_half_probs_with_long_distances(dtype):
    # Labels on a line; observed: both ends. Squared distances were cast to the probs' dtype: inf in
    # float16 above 65,504 (a distance above 256), 8 bits in bfloat16 (1,384 vs 1,382.75 below).
    cases = [(torch.arange(5) * 100, torch.tensor([[0.5, 0.5]])), (torch.arange(5) * 100, torch.tensor([[0.9, 0.1]])),
             (torch.arange(5) * 100, torch.tensor([[0.3, 0.7]])),
             (torch.tensor([0, 19, 30, 58]), torch.tensor([[0.9375, 0.6875]]))]
    for pos, probs in cases:
        pos, n = pos.double(), pos.shape[0]
        dist = (pos[:, None] - pos[None]).abs()
        edges = np.array([[i, i + 1, float(pos[i + 1] - pos[i])] for i in range(n - 1)])
        observed = torch.tensor([0, n - 1])
        probs = probs.to(dtype)
        ref = np.argsort((probs.double() @ dist[observed] ** 2).numpy()[0], kind="stable")
        for metric in (DenseMetric(dist), DenseMetric(dist.to(dtype)), GraphMetric(edges, num_nodes=n)):
            _, ids = Loki(metric, observed).frechet_topk(probs, n)
            assert ids[0].tolist() == ref.tolist(), (type(metric).__name__, pos.tolist(), probs.tolist())


def test_graph_parallel_edges_keep_the_shortest():
    for edges in ([[0, 1, 1.0], [0, 1, 1.0], [1, 2, 1.0]], [[0, 1, 5.0], [0, 1, 1.0], [1, 2, 1.0]],
                  [[1, 0, 1.0], [0, 1, 3.0], [1, 2, 1.0]]):
        g = GraphMetric(np.array(edges), num_nodes=3)
        assert g.distance(torch.tensor([0, 0]), torch.tensor([1, 2])).tolist() == [1.0, 2.0]
        assert GraphMetric(edges=edges).distance([0], [2]).tolist() == [2.0]
    coo = scipy.sparse.coo_matrix(([4.0, 1.5], ([0, 0], [1, 1])), shape=(2, 2))  # a duplicate sparse entry
    assert GraphMetric(adjacency=coo).distance([0], [1]).tolist() == [1.5]


def test_graph_edge_list_or_adjacency_is_never_guessed():
    # A 2- or 3-edge list is also a (2, 2) / (3, 3) matrix: it was read as an adjacency matrix.
    edges = np.array([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"could be an adjacency matrix or a list of 2 edges.*adjacency=.*edges="):
        GraphMetric(edges)
    with pytest.raises(ValueError, match="list of 3 edges"):
        GraphMetric(torch.tensor([[0, 1, 1.0], [1, 2, 1.0], [2, 3, 1.0]]))
    assert GraphMetric(edges=edges).num_labels == 3
    assert GraphMetric(edges, num_nodes=4).num_labels == 4
    assert GraphMetric(edges=[[0, 1, 1.0], [1, 2, 1.0], [2, 3, 2.0]]).distance([0], [3]).tolist() == [4.0]
    adj = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    assert GraphMetric(adjacency=adj).distance([0], [1]).tolist() == [2.0]
    assert GraphMetric(np.array([[0, 1], [1, 2], [2, 3], [3, 4]])).num_labels == 5  # (E, 2), E != 2: edges
    with pytest.raises(ValueError, match="exactly one of"):
        GraphMetric(edges, edges=edges)
    with pytest.raises(ValueError, match="node ids .* must be integers"):
        GraphMetric(edges=[[0, 1.5]])


def test_expected_squared_distance_checks_ids_and_reads_a_partial_matrix_both_ways():
    tree = TreeMetric([-1, 0, 0], [0, 1, 2])
    for bad, shown in ((torch.tensor([-1]), "-1"), (torch.tensor([3]), "3")):
        with pytest.raises(ValueError, match=rf"pred holds label id {shown}, out of range \[0, 3\)"):
            expected_squared_distance(bad, torch.tensor([0]), tree)
        with pytest.raises(ValueError, match=rf"target holds label id {shown}, out of range \[0, 3\)"):
            expected_squared_distance(torch.tensor([0]), bad, tree)
    with pytest.raises(ValueError, match="pred must not be empty"):
        expected_squared_distance(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), tree)
    # A partial (R, N) matrix: rows for labels 0..R-1; d is symmetric, so the order does not matter.
    d = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 1.5, 2.5]])
    partial = DenseMetric(d)
    pred, target = torch.tensor([2, 0, 3, 1]), torch.tensor([0, 3, 1, 1])
    want = float(np.mean(np.array([2.0, 3.0, 2.5, 0.0]) ** 2))
    assert expected_squared_distance(pred, target, partial) == pytest.approx(want)
    assert expected_squared_distance(target, pred, partial) == pytest.approx(want)
    with pytest.raises(ValueError, match="labels 2 and 3: .* rows for labels 0..1 only"):
        expected_squared_distance(torch.tensor([0, 2]), torch.tensor([1, 3]), partial)


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
