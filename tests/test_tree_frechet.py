"""shammie.tree_frechet_topk through TreeMetric, against brute-force float64 over networkx shortest
paths: random trees (weighted and unweighted), labels a subset of the nodes, candidates, k > 1, ties,
batch 1, every dtype; opcheck, torch.compile, bad input."""

import numpy as np
import pytest

nx = pytest.importorskip("networkx")
pytest.importorskip("scipy")
import torch  # noqa: E402

import shammie  # noqa: E402
from shammie.loki import TreeMetric  # noqa: E402
from tests.conftest import DEVICES, DTYPES, compile_fullgraph  # noqa: E402

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_tree(n, seed, weighted, deep=False):
    """A random recursive tree with shuffled node ids (so the root is not 0 and ids are not in order)."""
    rng = np.random.default_rng(seed)
    raw = np.array([-1] + [max(i - 1 - int(rng.integers(0, 3)), 0) if deep else int(rng.integers(0, i))
                           for i in range(1, n)])
    perm = rng.permutation(n)
    parent = np.full(n, -1)
    parent[perm[1:]] = perm[raw[1:]]
    weight = rng.uniform(0.1, 3.0, n) if weighted else None
    return parent, weight


def nx_distances(parent, weight, nodes):
    g = nx.Graph()
    g.add_nodes_from(range(len(parent)))
    for v, u in enumerate(parent):
        if u >= 0:
            g.add_edge(int(u), v, weight=1.0 if weight is None else float(weight[v]))
    out = np.empty((len(nodes), len(nodes)))
    for i, s in enumerate(nodes):
        lengths = nx.single_source_dijkstra_path_length(g, int(s))
        out[i] = [lengths[int(t)] for t in nodes]
    return out


def reference(probs, sq, k, mask):
    """Brute force in float64: values and stable-sorted label ids."""
    scores = probs.double().numpy() @ sq
    if mask is not None:
        scores[:, ~mask] = np.inf
    idx = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, idx, 1), idx, scores


def check_topk(values, indices, probs, sq, k, mask, dtype):
    ref_v, ref_i, scores = reference(probs.to(dtype).double().cpu(), sq, k, mask)
    assert values.shape == indices.shape == (probs.shape[0], k)
    assert values.dtype == dtype and indices.dtype == torch.int64
    idx = indices.cpu().numpy()
    scale = max(np.abs(ref_v).max(), 1.0)
    tol = TOL[dtype] * scale
    assert np.abs(values.double().cpu().numpy() - ref_v).max() <= tol
    chosen = np.take_along_axis(scores, idx, 1)        # the true f of what we returned
    assert np.isfinite(chosen).all(), "returned a non-candidate"
    assert np.abs(chosen - ref_v).max() <= tol
    assert all(len(set(row)) == k for row in idx.tolist())
    if dtype == torch.float64:
        np.testing.assert_array_equal(idx, ref_i)


def setup(n, seed, weighted, leaves_only=False, deep=False, K=6):
    parent, weight = random_tree(n, seed, weighted, deep)
    rng = np.random.default_rng(seed + 1)
    if leaves_only:
        labels = rng.permutation(np.setdiff1d(np.arange(n), parent[parent >= 0]))
    else:
        labels = np.arange(n)
    metric = TreeMetric(parent, weight, None if not leaves_only else torch.from_numpy(labels))
    d = nx_distances(parent, weight, labels)
    observed = torch.from_numpy(rng.choice(len(labels), size=min(K, len(labels)), replace=False))
    return metric, d ** 2, observed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_random_trees(device, dtype, weighted, k):
    for seed, n, leaves, deep in ((0, 60, False, False), (1, 90, True, False), (2, 50, False, True)):
        metric, sq, observed = setup(n, seed, weighted, leaves, deep)
        probs = torch.rand(37, observed.shape[0], dtype=torch.float64).to(device=device, dtype=dtype)
        values, indices = metric.frechet_topk(probs, observed, k)
        check_topk(values, indices, probs.cpu(), sq[observed.numpy()], k, None, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_candidates_mask_and_index(device, dtype):
    metric, sq, observed = setup(120, 5, True, K=9)
    rng = np.random.default_rng(3)
    mask = rng.random(metric.num_labels) < 0.3
    probs = torch.softmax(torch.randn(20, 9, dtype=torch.float64) * 2, 1).to(device=device, dtype=dtype)
    for cands in (torch.from_numpy(mask), torch.from_numpy(np.flatnonzero(mask))):
        for k in (1, 4):
            values, indices = metric.frechet_topk(probs, observed, k, cands)
            check_topk(values, indices, probs.cpu(), sq[observed.numpy()], k, mask, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_go_to_lowest_id(device, dtype):
    # Unweighted tree and dyadic probabilities: every f is exact, so ties are exact and the ids
    # must match a stable sort in both accumulation dtypes.
    metric, sq, observed = setup(80, 7, False, K=5)
    rng = np.random.default_rng(9)
    probs = torch.from_numpy(rng.integers(0, 3, size=(40, 5)) / 4.0)
    probs[probs.sum(1) == 0, 0] = 0.5
    probs = probs.to(device=device, dtype=dtype)
    values, indices = metric.frechet_topk(probs, observed, 5)
    ref_v, ref_i, _ = reference(probs.cpu().double(), sq[observed.numpy()], 5, None)
    np.testing.assert_array_equal(indices.cpu().numpy(), ref_i)
    np.testing.assert_array_equal(values.cpu().double().numpy(), ref_v)
    # the smallest star: root 0 with children 1, 2 observed equally; f = (1, 2, 2)
    star = TreeMetric(np.array([-1, 0, 0]))
    v, i = star.frechet_topk(torch.tensor([[0.5, 0.5]], dtype=dtype, device=device), torch.tensor([2, 1]), 3)
    assert i.tolist() == [[0, 1, 2]] and v.tolist() == [[1.0, 2.0, 2.0]]


@pytest.mark.parametrize("device", DEVICES)
def test_batch_one_zero_and_many(device):
    metric, sq, observed = setup(70, 11, True)
    for batch in (0, 1, 15, 16, 17, 100):
        probs = torch.rand(batch, observed.shape[0], dtype=torch.float64, device=device) + 0.01
        values, indices = metric.frechet_topk(probs, observed, 2)
        assert values.shape == (batch, 2)
        if batch:
            check_topk(values, indices, probs.cpu(), sq[observed.numpy()], 2, None, torch.float64)


def test_observed_at_the_root_and_repeated():
    parent, weight = random_tree(40, 13, True)
    metric = TreeMetric(parent, weight)
    sq = nx_distances(parent, weight, np.arange(40)) ** 2
    root = int(np.flatnonzero(parent == -1)[0])
    observed = torch.tensor([root, 5, 5, 17])
    probs = torch.rand(9, 4, dtype=torch.float64)
    values, indices = metric.frechet_topk(probs, observed, 3)
    check_topk(values, indices, probs, sq[observed.numpy()], 3, None, torch.float64)


def _plan(device="cpu"):
    metric, _, observed = setup(50, 17, True)
    return metric, observed, metric.plan(observed, None, 2, torch.device(device))


ORDER = ("parent", "edge", "depth", "obs_pos", "cand_t", "cand_label")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _, observed, plan = _plan(device)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        probs = torch.rand(5, observed.shape[0], device=device).to(dtype)
        torch.library.opcheck(torch.ops.shammie.tree_frechet_topk, (probs, *[plan[n] for n in ORDER], 2))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    _, observed, plan = _plan(device)
    args = [plan[n] for n in ORDER]

    def predict(logits):
        return shammie.tree_frechet_topk(torch.softmax(logits, dim=-1), *args, 2)

    logits = torch.randn(7, observed.shape[0], device=device)
    torch._dynamo.reset()
    got = compile_fullgraph(predict, device)(logits)
    want = predict(logits)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
def test_op_bad_plans(device):
    # The kernels index by the plan unchecked, so a bad plan must raise on every device.
    _, observed, plan = _plan()
    args = [plan[n].to(device) for n in ORDER]
    probs = torch.rand(3, observed.shape[0], device=device)
    op = shammie.tree_frechet_topk
    with pytest.raises(ValueError, match="observed classes"):
        op(probs[:, 1:], *args, 1)
    bad = args[0].clone()
    bad[3] = 7
    with pytest.raises(ValueError, match="preorder"):
        op(probs, bad, *args[1:], 1)
    bad = args[3].clone()
    bad[0] = 10_000
    with pytest.raises(ValueError, match="obs_pos.*out of range"):
        op(probs, *args[:3], bad, *args[4:], 1)
    with pytest.raises(ValueError, match="exceeds the number of candidates"):
        op(probs, *args, 10_000)
    with pytest.raises(TypeError, match="parent must be int64"):
        op(probs, args[0].int(), *args[1:], 1)
    with pytest.raises(TypeError, match="probs must be float"):
        op(probs.long(), *args, 1)
    with pytest.raises(ValueError, match="k must be at least 1"):
        op(probs, *args, 0)


def test_fake_checks_the_plan_like_the_op():
    # The fake checked only probs, the index dtypes and k >= 1: a plan of the wrong shapes traced under
    # torch.compile and failed only at run time. Each case raises the same error from the op and the fake.
    _, observed, plan = _plan()
    args = [plan[n] for n in ORDER]
    probs = torch.rand(3, observed.shape[0])
    cases = {
        "edge shape": ([args[0], args[1][1:], *args[2:]], 1, ValueError, "edge must have shape"),
        "depth shape": ([*args[:2], args[2][1:], *args[3:]], 1, ValueError, "depth must have shape"),
        "cand_t shape": ([*args[:4], args[4][:, :1].contiguous(), args[5]], 1, ValueError, "cand_t must have shape"),
        "cand_label rows": ([*args[:4], args[4][1:], args[5][1:]], 1, ValueError, "cand_label must be"),
        "parent rank": ([args[0][None], *args[1:]], 1, ValueError, "parent must be 1-D"),
        "edge dtype": ([args[0], args[1].long(), *args[2:]], 1, TypeError, "edge must be float32"),
        "k above the slots": (args, args[5].numel() + 1, ValueError, "exceeds the number of candidates"),
    }
    for name, (plan_args, k, error, message) in cases.items():
        with pytest.raises(error, match=message):
            shammie.tree_frechet_topk(probs, *plan_args, k)
        with pytest.raises(error, match=message):
            shammie.tree_frechet_topk(probs.to("meta"), *[a.to("meta") for a in plan_args], k)
    assert shammie.tree_frechet_topk(probs.to("meta"), *[a.to("meta") for a in args], 2)[1].shape == (3, 2)
