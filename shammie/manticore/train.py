"""Manticore's three training phases, each over a dataloader with tqdm progress:

1. pretrain_projectors: projectors only (models and α frozen);
2. search: DARTS-style alternation, α on validation batches and projectors on training batches (models frozen);
   GAEA mode updates α by exponentiated gradient, α ← α·exp(−η∇α) / Σ, which keeps every row on the simplex;
3. finetune: α fixed, the models and projectors (or a chosen subset) trained end to end.

A batch is a LongTensor of token ids (labels = the ids) or a dict with "input_ids" and optional "labels"
(-100 ignored), as for HF causal LMs: the loss is the shifted next-token cross-entropy.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from shammie.manticore.model import Manticore


class ExponentiatedGradient(torch.optim.Optimizer):
    """GAEA's mirror-descent step on the simplex: each row of p becomes p·exp(−lr·grad), renormalized."""

    def __init__(self, params, lr: float = 0.1):
        if not lr > 0:
            raise ValueError(f"ExponentiatedGradient: lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                # softmax(log p − lr·g) = p·exp(−lr·g) / Σ, without overflow
                logits = p.float().clamp_min(1e-30).log() - group["lr"] * g
                p.copy_(torch.softmax(logits, dim=-1).to(p.dtype))


def _batch(batch, device):
    if isinstance(batch, torch.Tensor):
        ids = batch.to(device)
        return ids, ids
    ids = batch["input_ids"].to(device)
    labels = batch.get("labels")
    return ids, (ids if labels is None else labels.to(device))


def _forever(loader: Iterable, name: str):
    """The loader's batches, pass after pass (a new pass re-shuffles a shuffling DataLoader)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"{name} yields no batches")


def _cycle(loader: Iterable, steps: int | None, name: str = "loader"):
    """steps batches (cycling the loader), or one pass when steps is None."""
    if steps is None:
        return iter(loader)
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be None or a non-negative int, got {steps!r}")
    return itertools.islice(_forever(loader, name), steps)


def _total(loader, steps):
    if steps is not None:
        return steps
    try:
        return len(loader)
    except TypeError:
        return None


def set_trainable(hybrid: Manticore, models: bool, projectors: bool, alpha: bool) -> None:
    for flag, params in ((models, hybrid.model_parameters()), (projectors, hybrid.projector_parameters()),
                         (alpha, hybrid.alpha_parameters())):
        for p in params:
            p.requires_grad_(flag)


def _alpha_optimizer(hybrid: Manticore, lr: float):
    if hybrid.config.alpha_mode == "gaea":
        return ExponentiatedGradient(hybrid.alpha_parameters(), lr=lr)
    return torch.optim.Adam(hybrid.alpha_parameters(), lr=lr, betas=(0.5, 0.999))


def _step(hybrid, batch, device, optimizer, params):
    ids, labels = _batch(batch, device)
    optimizer.zero_grad(set_to_none=True)
    _, loss = hybrid(ids, labels)
    loss.backward()
    if params:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.detach()


def _device(hybrid):
    return hybrid.alpha.device


def _postfix(bar, losses, every=10):
    if len(losses) % every == 0:       # one host sync every `every` steps, not every step
        bar.set_postfix(loss=f"{losses[-1].item():.4f}")


def _train(hybrid: Manticore, loader: Iterable, steps: int | None, params: list, lr: float, desc: str,
           progress: bool) -> dict:
    """One AdamW loop over `params` on the LM loss (the phases differ only in what trains)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    hybrid.train()
    losses = []
    bar = tqdm(_cycle(loader, steps), total=_total(loader, steps), desc=desc, disable=not progress)
    for batch in bar:
        losses.append(_step(hybrid, batch, _device(hybrid), optimizer, params))
        _postfix(bar, losses)
    return {"loss": [l.item() for l in losses]}


def _require_projectors_in_use(hybrid: Manticore, phase: str) -> None:
    """A programmed one-hot row bypasses its position's projectors: with every row one-hot they get no gradient."""
    if hybrid.programmed and all(a in (0.0, 1.0) for row in hybrid._host_alpha for a in row):
        raise ValueError(f"{phase}: the hybrid's programmed α is one-hot at every position, which bypasses the "
                         "projectors, so training them alone would do nothing; call hybrid.unprogram() first, "
                         "or train the models")


def pretrain_projectors(hybrid: Manticore, loader: Iterable, steps: int | None = None, lr: float = 1e-3,
                        progress: bool = True) -> dict:
    """Train the projectors alone (models and α frozen) on the LM loss; returns {"loss": [...]}."""
    _require_projectors_in_use(hybrid, "pretrain_projectors")
    set_trainable(hybrid, models=False, projectors=True, alpha=False)
    return _train(hybrid, loader, steps, hybrid.projector_parameters(), lr, "pretrain projectors", progress)


def search(hybrid: Manticore, train_loader: Iterable, val_loader: Iterable, steps: int | None = None,
           alpha_lr: float = 0.05, projector_lr: float = 1e-3, progress: bool = True) -> dict:
    """DARTS-style alternating search with the models frozen: each step updates α on a validation batch, then
    the projectors on a training batch (first-order); `steps` steps, or one pass over train_loader when None
    (val_loader is cycled either way). Returns {"loss", "val_loss", "alpha": [α per step]}."""
    hybrid.unprogram()
    set_trainable(hybrid, models=False, projectors=True, alpha=True)
    device = _device(hybrid)
    proj = hybrid.projector_parameters()
    alpha_opt = _alpha_optimizer(hybrid, alpha_lr)
    proj_opt = torch.optim.AdamW(proj, lr=projector_lr, weight_decay=0.0)
    hybrid.train()
    history = {"loss": [], "val_loss": [], "alpha": []}
    pairs = zip(_cycle(train_loader, steps, "train_loader"), _forever(val_loader, "val_loader"))
    bar = tqdm(pairs, total=_total(train_loader, steps), desc="search", disable=not progress)
    for train_batch, val_batch in bar:
        # α on validation data (projector grads from this pass are dropped)
        ids, labels = _batch(val_batch, device)
        alpha_opt.zero_grad(set_to_none=True)
        _, val_loss = hybrid(ids, labels)
        (grad,) = torch.autograd.grad(val_loss, hybrid.alpha_parameters())
        hybrid.alpha.grad = grad
        alpha_opt.step()
        # projectors on training data (α fixed for this pass)
        hybrid.alpha.requires_grad_(False)
        history["loss"].append(_step(hybrid, train_batch, device, proj_opt, proj))
        hybrid.alpha.requires_grad_(True)
        history["val_loss"].append(val_loss.detach())
        with torch.no_grad():
            hybrid.eval()
            history["alpha"].append(hybrid.mixture_weights().detach().clone())
            hybrid.train()
        _postfix(bar, history["loss"])
    return {"loss": [l.item() for l in history["loss"]], "val_loss": [l.item() for l in history["val_loss"]],
            "alpha": [a.cpu().tolist() for a in history["alpha"]]}


def finetune(hybrid: Manticore, loader: Iterable, steps: int | None = None, lr: float = 1e-4,
             train: Sequence[str] = ("models", "projectors"), progress: bool = True) -> dict:
    """Train with α fixed: `train` names the parts that learn ("models", "projectors"). An unprogrammed α is
    first fixed at its current (expected) value with program(). Returns {"loss": [...]}."""
    unknown = set(train) - {"models", "projectors"}
    if unknown or not train:
        raise ValueError(f"finetune: train must name 'models' and/or 'projectors', got {list(train)}")
    if not hybrid.programmed:
        hybrid.eval()
        with torch.no_grad():
            hybrid.program(hybrid.mixture_weights().detach().double().cpu())
    if "models" not in train:
        _require_projectors_in_use(hybrid, "finetune")
    set_trainable(hybrid, models="models" in train, projectors="projectors" in train, alpha=False)
    return _train(hybrid, loader, steps, [p for p in hybrid.parameters() if p.requires_grad], lr, "finetune", progress)
