"""frechet_topk and gemm_bias_topk against a brute-force float64 numpy search: random dense data,
k > 1, ties, batch 1, candidate masks and id lists, every dtype; opcheck, torch.compile and bad input."""

import numpy as np
import pytest
import torch

import shammie
from conftest import DEVICES, DTYPES, EMULATING_CUDA, compile_fullgraph

@pytest.fixture(autouse=True, params=["kernel", "gemm"])
def impl(request, monkeypatch):
    """Every test on both implementations: the fused kernels, and the tiled GEMMs plus selection."""
    monkeypatch.setenv("SHAMMIE_FRECHET_IMPL", request.param)
    return request.param


# Relative tolerance on the values (scale: the largest |score| of the row block): the inputs are the
# same numbers in every dtype, so what differs is fp32 accumulation and the rounding of the output.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference(x, w, bias=None, k=1, candidates=None, largest=False):
    """Brute force in float64 numpy: (values, indices, full scores); ties to the lowest label id."""
    x64, w64 = x.double().cpu().numpy(), w.double().cpu().numpy()
    scores = x64 @ w64 + (0 if bias is None else bias.double().cpu().numpy())
    ids = np.arange(w64.shape[1])
    if candidates is not None:
        c = candidates.cpu().numpy()
        ids = np.nonzero(c)[0] if c.dtype == bool else np.unique(c)
    sub = scores[:, ids]
    order = np.argsort(-sub if largest else sub, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sub, order, 1), ids[order], scores


def check(values, indices, x, w, bias=None, k=1, candidates=None, largest=False):
    ref_v, ref_i, scores = reference(x, w, bias, k, candidates, largest)
    assert values.shape == indices.shape == ref_i.shape
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    tol = RTOL[x.dtype] * max(np.abs(scores).max(), 1.0)
    v, i = values.double().cpu().numpy(), indices.cpu().numpy()
    np.testing.assert_allclose(v, ref_v, rtol=0, atol=tol)
    # Low precision may reorder near-ties: the score at each returned label must be the true k-th best.
    np.testing.assert_allclose(np.take_along_axis(scores, i, 1), ref_v, rtol=0, atol=tol)
    assert all(len(set(row)) == k for row in i.tolist()), "a label returned twice"
    if x.dtype in (torch.float32, torch.float64):
        assert (np.diff(v, axis=1) >= 0).all() if not largest else (np.diff(v, axis=1) <= 0).all()


def make(B, K, N, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(B, K, generator=g), dim=1)
    sq = torch.rand(K, N, generator=g) * 4
    return probs.to(device, dtype), sq.to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
# k = 13 and 32 reach the GEMM selection's two longest lists (16 and 32 entries); the last two shapes
# leave the GEMM implementation several column blocks, segments and row blocks.
@pytest.mark.parametrize("B,K,N,k", [(1, 7, 50, 1), (37, 13, 1500, 1), (300, 17, 1300, 5), (5, 64, 40, 40),
                                     (260, 9, 600, 2), (2100, 3, 300, 2), (64, 11, 2500, 13), (33, 6, 3000, 32),
                                     (4096, 3, 4100, 3), (9000, 2, 2100, 2)])
def test_frechet_topk_dense(device, dtype, B, K, N, k, impl):
    if B * N > 10**7 and (impl == "kernel" or dtype in (torch.float64, torch.float16)):
        pytest.skip("the large shapes test the GEMM implementation's blocking; two dtypes suffice")
    probs, sq = make(B, K, N, dtype, device)
    values, indices = shammie.frechet_topk(probs, sq, k=k)
    check(values, indices, probs, sq, k=k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_gemm_bias_topk(device, dtype, largest, k):
    g = torch.Generator().manual_seed(1)
    x, w, bias = torch.randn(70, 33, generator=g), torch.randn(33, 900, generator=g), torch.randn(900, generator=g)
    x, w, bias = (t.to(device, dtype) for t in (x, w, bias))
    values, indices = shammie.gemm_bias_topk(x, w, bias, k=k, largest=largest)
    check(values, indices, x, w, bias, k=k, largest=largest)
    values, indices = shammie.gemm_bias_topk(x, w, None, k=k, largest=largest)
    check(values, indices, x, w, None, k=k, largest=largest)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mask", "ids"])
def test_candidates(device, dtype, kind):
    probs, sq = make(40, 11, 1200, dtype, device, seed=2)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(1200, generator=g) < 0.3
    cand = mask if kind == "mask" else torch.nonzero(mask).view(-1)[torch.randperm(int(mask.sum()), generator=g)]
    cand = cand.to(device)
    for k in (1, 4):
        values, indices = shammie.frechet_topk(probs, sq, k=k, candidates=cand)
        check(values, indices, probs, sq, k=k, candidates=cand)
        assert mask[indices.cpu()].all()
    bias = torch.randn(1200, generator=g).to(device, dtype)
    values, indices = shammie.gemm_bias_topk(probs, sq, bias, k=2, candidates=cand, largest=True)
    check(values, indices, probs, sq, bias, k=2, candidates=cand, largest=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_the_lowest_index(device, dtype):
    # Small integers: every score is exact in every dtype, and many tie.
    g = torch.Generator().manual_seed(4)
    probs = torch.randint(0, 3, (50, 6), generator=g).float()
    sq = torch.randint(0, 3, (6, 1100), generator=g).float()
    probs, sq = probs.to(device, dtype), sq.to(device, dtype)
    for k in (1, 5, 16, 32):
        ref_v, ref_i, _ = reference(probs, sq, k=k)
        values, indices = shammie.frechet_topk(probs, sq, k=k)
        assert (indices.cpu().numpy() == ref_i).all()
        assert (values.double().cpu().numpy() == ref_v).all()
    # All labels equal: the first k.
    values, indices = shammie.frechet_topk(probs, torch.ones_like(sq), k=3)
    assert (indices.cpu() == torch.arange(3)).all()


# The fused CPU kernel's own paths: the GEMM implementation has none of them.
KERNEL_ONLY = pytest.mark.parametrize("impl", ["kernel"], indirect=True)


@KERNEL_ONLY
@pytest.mark.skipif(EMULATING_CUDA, reason="checks the CPU kernels' instruction sets, replaced under SHAMMIE_EMULATE_CUDA")
@pytest.mark.parametrize("isa", ["base", "avx512"])
@pytest.mark.parametrize("kind", ["all", "ids"])
@pytest.mark.parametrize("K", [1, 2, 999, 1000])
def test_bf16_on_every_cpu_path(isa, kind, K, monkeypatch):
    # bf16 runs on AVX512-BF16 dot products where the processor has them (csrc/common/bf16_dot.h),
    # else through fp32 MKL; SHAMMIE_CPU_ISA=base forces the latter. Row counts and label counts leave
    # tails of both micro-tiles (6 rows, 64 columns) and of the 16-column padding.
    monkeypatch.setenv("SHAMMIE_CPU_ISA", isa)
    probs, sq = make(1031, K, 600, torch.bfloat16, "cpu", seed=K)
    cand = torch.arange(3, 600, 2) if kind == "ids" else None
    for k in (1, 3):
        values, indices = shammie.frechet_topk(probs, sq, k=k, candidates=cand)
        check(values, indices, probs, sq, k=k, candidates=cand)


@KERNEL_ONLY
def test_bf16_odd_k_never_reads_past_a_row():
    # With odd K the last pair of a row is x[K-1] and a zero; the next row's first element (here inf,
    # which times that zero would be NaN) must not leak into it.
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(14, 7, generator=g), torch.randn(7, 100, generator=g)
    x[1::2, 0] = float("inf")
    x, w = x.bfloat16(), w.bfloat16()
    values, indices = shammie.gemm_bias_topk(x[0::2].contiguous(), w, None, k=2)
    check(values, indices, x[0::2], w, k=2)
    values, indices = shammie.gemm_bias_topk(x, w, None, k=2)
    assert torch.isfinite(values[0::2].float()).all()
    check(values[0::2], indices[0::2], x[0::2], w, k=2)


@pytest.mark.parametrize("device", DEVICES)
def test_duplicate_candidate_ids_count_once(device):
    probs, sq = make(3, 4, 20, torch.float32, device)
    cand = torch.tensor([7, 3, 7, 3], device=device)
    values, indices = shammie.frechet_topk(probs, sq, k=2, candidates=cand)
    assert sorted(indices[0].tolist()) == [3, 7]
    with pytest.raises(ValueError, match="more than the number of candidate labels"):
        shammie.frechet_topk(probs, sq, k=3, candidates=cand)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fewer_than_k_non_nan_scores_end_in_minus_one(device, dtype):
    # Documented: NaN scores are never chosen; the slots they would fill hold index -1 and value NaN.
    probs, sq = make(3, 4, 6, dtype, device)
    sq[:, 2] = float("nan")
    values, indices = shammie.frechet_topk(probs, sq, k=6)
    assert (indices[:, -1] == -1).all() and torch.isnan(values[:, -1]).all()
    assert sorted(indices[0, :5].tolist()) == [0, 1, 3, 4, 5]
    v, i = shammie.gemm_bias_topk(probs, sq, None, k=6, largest=True)
    assert (i[:, -1] == -1).all() and torch.isnan(v[:, -1]).all()


def _candidate_cases(device):
    probs, sq = make(3, 4, 20, torch.float32, device)
    return probs, sq, {
        "2-D ids": (torch.tensor([[1, 2]], device=device), ValueError, "candidates must be 1-D"),
        "2-D mask": (torch.ones(4, 5, dtype=torch.bool, device=device), ValueError, "candidates must be 1-D"),
        "short mask": (torch.ones(19, dtype=torch.bool, device=device), ValueError,
                       r"bool candidates mask must have shape \(N,\) = \(20,\)"),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_fake_checks_candidates_like_the_op(device):
    # The fake (torch.compile, meta) raised nothing for these; the op raises, so a compiled graph would
    # trace a call the kernel refuses.
    probs, sq, cases = _candidate_cases(device)
    for name, (cand, error, message) in cases.items():
        with pytest.raises(error, match=message):
            shammie.frechet_topk(probs, sq, 1, cand)
        with pytest.raises(error, match=message):
            shammie.frechet_topk(probs.to("meta"), sq.to("meta"), 1, cand.to("meta"))
        with pytest.raises(error, match=message):
            shammie.gemm_bias_topk(probs.to("meta"), sq.to("meta"), None, 1, cand.to("meta"))
    # Repeated ids count once in the op; the fake's (B, k) agrees wherever the op succeeds.
    cand = torch.tensor([7, 3, 7, 3, 7], device=device)
    assert shammie.frechet_topk(probs, sq, 2, cand)[1].shape == (3, 2)
    assert shammie.frechet_topk(probs.to("meta"), sq.to("meta"), 2, cand.to("meta"))[1].shape == (3, 2)
    torch.library.opcheck(torch.ops.shammie.frechet_topk, (probs, sq, 2, cand))
    torch.library.opcheck(torch.ops.shammie.gemm_bias_topk, (probs, sq, None, 2, cand, True))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    probs, sq = make(30, 12, 400, torch.float32, device)
    p2, s2 = probs.t().contiguous().t(), sq.t().contiguous().t()
    values, indices = shammie.frechet_topk(p2, s2, k=3)
    check(values, indices, probs, sq, k=3)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    probs, sq = make(0, 5, 30, torch.float32, device)
    values, indices = shammie.frechet_topk(probs, sq, k=2)
    assert values.shape == indices.shape == (0, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    probs, sq = make(9, 5, 70, torch.float32, device)
    torch.library.opcheck(torch.ops.shammie.frechet_topk, (probs, sq, 3, None))
    torch.library.opcheck(torch.ops.shammie.frechet_topk, (probs, sq, 2, torch.arange(0, 70, 3, device=device)))
    bias = torch.randn(70, device=device)
    torch.library.opcheck(torch.ops.shammie.gemm_bias_topk, (probs, sq, bias, 2, sq[0] > 2, True))
    torch.library.opcheck(torch.ops.shammie.gemm_bias_topk, (probs.double(), sq.double(), None, 1, None, False))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    probs, sq = make(9, 5, 70, torch.float32, device)
    bias = torch.randn(70, device=device)

    def search(p, d, b):
        v1, i1 = shammie.frechet_topk(p * 2, d, k=2)
        v2, i2 = shammie.gemm_bias_topk(p, d, b, k=1, largest=True)
        return v1 + 1, i1, v2, i2

    torch._dynamo.reset()
    got = compile_fullgraph(search, device)(probs, sq, bias)
    for a, b in zip(got, search(probs, sq, bias)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    probs, sq = make(4, 5, 30, torch.float32, device)
    f = shammie.frechet_topk
    bad_probs = probs.clone()
    bad_probs[1, 2] = -0.1
    with pytest.raises(ValueError, match="probs must be non-negative with no NaN"):
        f(bad_probs, sq)
    bad_probs[1, 2] = float("nan")
    with pytest.raises(ValueError, match="probs must be non-negative with no NaN"):
        f(bad_probs, sq)
    with pytest.raises(ValueError, match="their K must match"):
        f(probs, sq[:4])
    with pytest.raises(ValueError, match="more than the number of candidate labels"):
        f(probs, sq, k=31)
    with pytest.raises(ValueError, match="more than the number of candidate labels"):
        f(probs, sq, k=3, candidates=torch.arange(30, device=device) < 2)
    with pytest.raises(ValueError, match="k must be at least 1"):
        f(probs, sq, k=0)
    with pytest.raises(TypeError, match="sq_dists must have the same dtype"):
        f(probs, sq.double())
    with pytest.raises(TypeError, match="probs must be float32"):
        f(probs.long(), sq.long())
    with pytest.raises(ValueError, match="probs must be 2-D"):
        f(probs[0], sq)
    with pytest.raises(ValueError, match="sq_dists must be 2-D"):
        f(probs, sq[None])
    with pytest.raises(ValueError, match=r"candidates must be label ids in \[0, N\)"):
        f(probs, sq, candidates=torch.tensor([0, 30], device=device))
    with pytest.raises(ValueError, match=r"candidates must be label ids in \[0, N\)"):
        f(probs, sq, candidates=torch.tensor([-1, 3], device=device))
    with pytest.raises(TypeError, match="candidates must be a bool mask or an int64"):
        f(probs, sq, candidates=torch.tensor([1, 3], device=device, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"bool candidates mask must have shape \(N,\)"):
        f(probs, sq, candidates=torch.ones(29, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="bias must have shape"):
        shammie.gemm_bias_topk(probs, sq, torch.zeros(29, device=device))
    if device == "cpu":
        with pytest.raises(ValueError, match="sq_dists must be on the same device"):
            f(probs, sq.to("meta"))
