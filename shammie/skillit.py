"""Skill-It online data mixing (Chen et al. 2023): sample training skills from a mixture updated by
multiplicative weights over a skills graph A (k_train × k_eval),
p_t ∝ prior ⊙ exp(η · A · Σ_{τ = t−w+1..t} L_τ), L_τ the per-skill validation losses
(the mean over the window instead of the sum when only target skills are tracked).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch

__all__ = ["SkillItSampler", "estimate_skills_graph"]


def _whole(x, least: int) -> bool:
    """x is an integer (or an integer-valued float) >= least; not a bool, a string or inf."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x == int(x) \
        and x >= least


class SkillItSampler:
    """Online mixture over k_train skills.

    graph: (k_train, k_eval) skills graph, A[i, j] > 0 when training on skill i helps skill j.
    eta: the multiplicative-weights step size η > 0 (research code: 0.5 for LEGO, 0.2–0.8 for
      Natural Instructions). window: the number w of latest evaluations summed (research code: 3).
    prior: (k_train,) non-negative prior mixture (default uniform); the mixture before any update.
    target_mask: (k_eval,) bool, the target skills: only their losses enter the update, and the window is
      averaged instead of summed.
    """

    def __init__(self, graph, eta: float = 0.5, window: int = 3, prior=None, target_mask=None):
        A = torch.as_tensor(graph, dtype=torch.float64)
        if A.dim() != 2 or A.numel() == 0:
            raise ValueError(f"graph: expected a non-empty (k_train, k_eval) matrix, got shape {tuple(A.shape)}")
        if not bool(torch.isfinite(A).all()):
            raise ValueError("graph: expected finite entries")
        # inf would turn the mixture into NaN at the first update
        if not (isinstance(eta, numbers.Real) and math.isfinite(eta) and eta > 0):
            raise ValueError(f"eta: expected a finite η > 0, got {eta!r}")
        if not _whole(window, 1):
            raise ValueError(f"window: expected an integer >= 1, got {window!r}")
        k_train, k_eval = A.shape
        if prior is None:
            prior = torch.full((k_train,), 1.0 / k_train, dtype=torch.float64)
        prior = torch.as_tensor(prior, dtype=torch.float64)
        if prior.shape != (k_train,) or not bool(torch.isfinite(prior).all()) or bool((prior < 0).any()) \
                or not float(prior.sum()) > 0:
            raise ValueError(f"prior: expected ({k_train},) finite non-negative weights with a positive sum, "
                             f"got shape {tuple(prior.shape)}")
        if target_mask is not None:
            target_mask = torch.as_tensor(target_mask, dtype=torch.bool)
            if target_mask.shape != (k_eval,) or not bool(target_mask.any()):
                raise ValueError(f"target_mask: expected a ({k_eval},) bool mask with at least one target skill, "
                                 f"got shape {tuple(target_mask.shape)}")
        self.graph, self.eta, self.window = A, float(eta), int(window)
        self.prior = prior / prior.sum()
        self.target_mask = target_mask
        self.history: list[torch.Tensor] = []
        self._logits = self.prior.log()  # -inf where the prior is 0: such a skill is never drawn
        self._mixture = self.prior.clone()

    @property
    def mixture(self) -> torch.Tensor:
        """The current sampling mixture (k_train,), float64, sums to 1."""
        return self._mixture

    def update(self, val_losses) -> torch.Tensor:
        """Record one evaluation L (k_eval,) of per-skill validation losses; returns the new mixture."""
        L = torch.as_tensor(val_losses, dtype=torch.float64).flatten()
        if L.numel() != self.graph.shape[1]:
            raise ValueError(f"val_losses: expected {self.graph.shape[1]} per-skill losses (the graph's k_eval), "
                             f"got {L.numel()}")
        if not bool(torch.isfinite(L).all()):
            raise ValueError(f"val_losses: expected finite losses, got {L.tolist()}")
        if self.target_mask is not None:
            L = torch.where(self.target_mask, L, torch.zeros_like(L))
        self.history = (self.history + [L])[-self.window:]
        agg = torch.stack(self.history).sum(0)
        if self.target_mask is not None:
            agg = agg / len(self.history)
        self._logits = self.prior.log() + self.eta * (self.graph @ agg)
        self._mixture = torch.softmax(self._logits, dim=0)  # prior ⊙ exp(·), normalized stably
        return self._mixture

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n skill indices (int64) drawn i.i.d. from the current mixture."""
        if not _whole(n, 0):
            raise ValueError(f"n: expected an integer >= 0, got {n!r}")
        if n == 0:  # torch.multinomial refuses 0 samples
            return torch.zeros(0, dtype=torch.long)
        return torch.multinomial(self._mixture, n, replacement=True, generator=generator)

    def torch_sampler(self, dataset_skill_ids, steps: int, generator: torch.Generator | None = None):
        """A torch.utils.data.Sampler of `steps` dataset indices: each draws a skill from the mixture current
        at that moment (updates between batches take effect) and then an example of that skill uniformly."""
        return _SkillSampler(self, dataset_skill_ids, steps, generator)


class _SkillSampler(torch.utils.data.Sampler):
    def __init__(self, owner: SkillItSampler, skill_ids, steps: int, generator):
        ids = torch.as_tensor(skill_ids).flatten()
        k = owner.graph.shape[0]
        fractional = ids.is_floating_point() and not bool((ids == ids.round()).all())
        if ids.dtype == torch.bool or ids.is_complex() or fractional:
            raise ValueError(f"dataset_skill_ids: expected integer skill ids, got {ids.dtype} values that are not "
                             f"all whole numbers")
        ids = ids.long()
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= k:
            raise ValueError(f"dataset_skill_ids: expected skill ids in [0, {k - 1}] (the graph's k_train rows)")
        if not _whole(steps, 0):
            raise ValueError(f"steps: expected an integer >= 0, got {steps!r}")
        counts = torch.bincount(ids, minlength=k)
        # the prior is a factor of every later mixture: a skill it zeroes is never drawn
        if not bool((owner.prior[counts > 0] > 0).any()):
            raise ValueError(f"prior: gives weight 0 to every skill present in dataset_skill_ids "
                             f"({(counts > 0).nonzero().flatten().tolist()}); nothing could be sampled")
        self.owner, self.steps, self.generator = owner, int(steps), generator
        self.order = torch.argsort(ids, stable=True)  # example indices grouped by skill
        self.offsets = torch.cumsum(counts, 0) - counts
        self.counts = counts

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            # the mixture over the skills present, from the logits: renormalizing the mixture instead could
            # divide by 0 where the present skills' weights underflow
            logits = self.owner._logits
            p = torch.softmax(torch.where(self.counts > 0, logits, torch.full_like(logits, -math.inf)), 0)
            skill = int(torch.multinomial(p, 1, generator=self.generator))
            j = int(torch.randint(int(self.counts[skill]), (1,), generator=self.generator))
            yield int(self.order[self.offsets[skill] + j])


def estimate_skills_graph(train_on: Callable[[int, int], object], eval_losses: Callable[[object], Sequence[float]],
                          k: int, steps: int, nonnegative: bool = False) -> torch.Tensor:
    """The brute-force skills graph: A[i, j] = (L_j(start) − L_j(after training on i)) / L_j(start).

    train_on(i, steps): trains on skill i for `steps` steps from the same starting checkpoint every time
      (the callable restores it) and returns the trained model (any object).
    eval_losses(model): the per-skill validation losses (k_eval,); eval_losses(None) evaluates the
      starting checkpoint.
    nonnegative: clip negative entries (training on i hurt j) to 0.
    Returns A (k, k_eval) float64.
    """
    if k < 1 or steps < 1:
        raise ValueError(f"k and steps: expected >= 1, got k={k}, steps={steps}")
    base = torch.as_tensor(eval_losses(None), dtype=torch.float64).flatten()
    if not bool(torch.isfinite(base).all()) or bool((base <= 0).any()):
        raise ValueError(f"eval_losses(None): expected positive finite losses, got {base.tolist()}")
    rows = []
    for i in range(k):  # one short training run per skill
        after = torch.as_tensor(eval_losses(train_on(i, steps)), dtype=torch.float64).flatten()
        if after.shape != base.shape or not bool(torch.isfinite(after).all()):
            raise ValueError(f"eval_losses after training on skill {i}: expected {base.numel()} finite losses")
        rows.append((base - after) / base)
    A = torch.stack(rows)
    return A.clamp_min(0) if nonnegative else A
