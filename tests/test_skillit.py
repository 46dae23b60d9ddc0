"""shammie.skillit: the multiplicative-weights update by hand, window / target mask / prior, sampler
frequencies, and recovery of a planted skills graph on independent linear tasks."""

import math

import pytest
import torch

from shammie.skillit import SkillItSampler, estimate_skills_graph


def normalized(v):
    v = torch.tensor(v, dtype=torch.float64)
    return v / v.sum()


def test_update_matches_formula_by_hand():
    A = [[1.0, 0.5], [0.0, 1.0], [0.2, 0.0]]
    s = SkillItSampler(A, eta=0.5, window=3)
    torch.testing.assert_close(s.mixture, normalized([1, 1, 1]))
    p = s.update([2.0, 1.0])
    # A·L = [2.5, 1.0, 0.4]
    torch.testing.assert_close(p, normalized([math.exp(1.25), math.exp(0.5), math.exp(0.2)]))
    p = s.update([1.0, 3.0])
    # Σ L = [3, 4]; A·ΣL = [5, 4, 0.6]
    torch.testing.assert_close(p, normalized([math.exp(2.5), math.exp(2.0), math.exp(0.3)]))
    assert torch.equal(s.mixture, p)


def test_window_drops_old_evaluations():
    s = SkillItSampler(torch.eye(2), eta=1.0, window=2)
    s.update([5.0, 0.0])
    s.update([1.0, 1.0])
    p = s.update([0.0, 2.0])  # window = the last two: Σ = [1, 3]
    torch.testing.assert_close(p, normalized([math.exp(1), math.exp(3)]))


def test_prior_and_target_mask():
    A = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    s = SkillItSampler(A, eta=0.5, window=3, prior=[3.0, 1.0])
    torch.testing.assert_close(s.mixture, normalized([3, 1]))
    p = s.update([1.0, 1.0])  # A·L = [2, 2]
    torch.testing.assert_close(p, normalized([3 * math.e, 1 * math.e]))
    t = SkillItSampler(A, eta=0.5, window=3, target_mask=[False, True])
    t.update([7.0, 2.0])  # skill 0's loss is not tracked
    p = t.update([9.0, 4.0])  # mean over the window of the target losses: [0, 3]; A·L = [3, 6]
    torch.testing.assert_close(p, normalized([math.exp(1.5), math.exp(3.0)]))


def test_input_checks():
    with pytest.raises(ValueError, match="eta"):
        SkillItSampler(torch.eye(2), eta=0.0)
    with pytest.raises(ValueError, match="window"):
        SkillItSampler(torch.eye(2), window=0)
    with pytest.raises(ValueError, match="prior"):
        SkillItSampler(torch.eye(2), prior=[1.0, -1.0])
    with pytest.raises(ValueError, match="target_mask"):
        SkillItSampler(torch.eye(2), target_mask=[False, False])
    s = SkillItSampler(torch.ones(2, 3))
    with pytest.raises(ValueError, match="expected 3 per-skill losses"):
        s.update([1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        s.update([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="skill ids"):
        s.torch_sampler([0, 2], steps=3)


def test_edge_inputs():
    """eta=inf (a NaN mixture), fractional skill ids (truncated), a prior zero on every skill in the dataset
    (failed mid-iteration) and steps=-1 are clear errors; sample(0) is empty; messages show the repr."""
    A = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for eta in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="eta: expected a finite"):
            SkillItSampler(A, eta=eta)
    with pytest.raises(ValueError, match="window: expected an integer >= 1, got '3'"):
        SkillItSampler(A, window="3")
    with pytest.raises(ValueError, match="window"):
        SkillItSampler(A, window=float("inf"))
    s = SkillItSampler(A)
    with pytest.raises(ValueError, match="dataset_skill_ids: expected integer skill ids"):
        s.torch_sampler([0.7, 1.2, 2.9], steps=1)
    assert s.torch_sampler([0.0, 2.0], steps=1).counts.tolist() == [1, 0, 1]  # whole-valued floats are ids
    with pytest.raises(ValueError, match="prior: gives weight 0 to every skill present"):
        SkillItSampler(A, prior=[0.5, 0.5, 0.0]).torch_sampler([2, 2], steps=1)
    with pytest.raises(ValueError, match="steps: expected an integer >= 0, got -1"):
        s.torch_sampler([0, 1], steps=-1)
    assert len(s.torch_sampler([0, 1], steps=0)) == 0
    empty = s.sample(0)
    assert empty.shape == (0,) and empty.dtype == torch.long
    with pytest.raises(ValueError, match="n: expected an integer >= 0"):
        s.sample(-1)


def test_sampler_survives_underflow_of_present_skills():
    """Skill 0 is the only one in the dataset and its mixture weight underflows to 0: the sampler still draws
    it (from the logits restricted to the present skills) instead of failing in multinomial."""
    s = SkillItSampler(torch.tensor([[0.0], [1.0]]), eta=1.0, window=1)
    s.update([1e4])
    assert s.mixture[0] == 0
    assert list(s.torch_sampler([0, 0, 0], steps=4, generator=torch.Generator().manual_seed(0))) != []


def test_sampler_frequencies_match_mixture():
    s = SkillItSampler(torch.eye(3), eta=1.0)
    s.update([0.0, 1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    n = 200000
    freq = torch.bincount(s.sample(n, g), minlength=3).double() / n
    torch.testing.assert_close(freq, s.mixture, atol=4 * (0.25 / n) ** 0.5, rtol=0)
    skill_ids = torch.tensor([2, 0, 1, 1, 2, 0, 0, 2, 1, 1])
    idx = torch.tensor(list(s.torch_sampler(skill_ids, steps=20000, generator=g)))
    assert len(s.torch_sampler(skill_ids, steps=7)) == 7
    freq = torch.bincount(skill_ids[idx], minlength=3).double() / idx.numel()
    torch.testing.assert_close(freq, s.mixture, atol=0.02, rtol=0)
    # examples within a skill are drawn uniformly
    within = torch.bincount(idx[skill_ids[idx] == 1], minlength=10)[[2, 3, 8, 9]].double()
    assert (within / within.sum() - 0.25).abs().max() < 0.03
    # the sampler sees updates made while it is iterated
    it = iter(s.torch_sampler(skill_ids, steps=2000, generator=g))
    s.update([0.0, 0.0, 60.0])
    late = torch.tensor([next(it) for _ in range(2000)])
    assert (skill_ids[late] == 2).float().mean() > 0.99


def test_estimate_recovers_planted_graph():
    """Skill j is linear regression onto the sum of components S_j; training on i moves the components in
    S_i, so it lowers skill j's loss exactly when S_i and S_j share a component."""
    torch.manual_seed(0)
    dim, comps = 8, 5
    S = [[0], [0, 1], [2], [3, 4], [4]]
    k = len(S)
    planted = torch.tensor([[float(bool(set(a) & set(b))) for b in S] for a in S])
    W_true = torch.randn(comps, dim)
    X = torch.randn(256, dim)

    def loss(W, j):
        w = W[S[j]].sum(0)
        w_true = W_true[S[j]].sum(0)
        return ((X @ (w - w_true)) ** 2).mean()

    start = torch.zeros(comps, dim)

    def train_on(i, steps):
        W = start.clone().requires_grad_(True)
        opt = torch.optim.SGD([W], lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            loss(W, i).backward()
            opt.step()
        return W.detach()

    def eval_losses(W):
        W = start if W is None else W
        return [loss(W, j).item() for j in range(k)]

    A = estimate_skills_graph(train_on, eval_losses, k=k, steps=30)
    assert A.shape == (k, k)
    assert torch.equal((A > 0.05).float(), planted), A
    assert (A.diagonal() > 0.5).all()
    assert (estimate_skills_graph(train_on, eval_losses, k=k, steps=30, nonnegative=True) >= 0).all()
