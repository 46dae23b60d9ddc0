"""Loki: geometry-aware prediction over a metric label space, without retraining.

Given a classifier's probabilities p over its K observed labels λ_1..λ_K, Loki predicts the Fréchet
mean ŷ = argmin_y Σ_k p_k · d(y, λ_k)² over the whole label space, which may hold labels the model
never saw. `Loki(metric, observed).predict(probs)`; metrics in shammie.loki.metrics.
"""

from __future__ import annotations

import torch

from shammie.loki import _search
from shammie.loki.metrics import DenseMetric, EmbeddingMetric, GraphMetric, Metric, TreeMetric


class Loki:
    """metric: a Metric; observed (K,) LongTensor: the label id of each of the model's classes, in the
    model's class order; candidates: optional bool mask (N,) or index tensor restricting predictions."""

    def __init__(self, metric: Metric, observed, candidates=None):
        self.metric = metric
        self.observed = _search.check_labels(observed, metric.num_labels, "observed")
        self.candidates = candidates

    def predict(self, probs: torch.Tensor, k: int = 1) -> torch.Tensor:
        """Label ids: (B,) for k = 1, else (B, k) ordered from the best."""
        _, indices = self.metric.frechet_topk(probs, self.observed, k, self.candidates)
        return indices[:, 0] if k == 1 else indices

    def frechet_topk(self, probs: torch.Tensor, k: int = 1):
        """(values, indices), each (B, k): the k smallest Σ_k p_k d(y, λ_k)² and their label ids."""
        return self.metric.frechet_topk(probs, self.observed, k, self.candidates)

    def locus(self) -> torch.Tensor:
        """The candidate label ids (ascending) that predict can return for some probs: the Fréchet means
        over the candidates (all labels by default) for some p in the simplex (see Metric.locus)."""
        return self.metric.locus(self.observed, self.candidates)

    def next_class(self) -> int:
        """Active selection: the candidate label farthest from the locus (ties to the lowest id)."""
        return self.metric.next_class(self.observed, self.candidates)


def expected_squared_distance(pred, target, metric: Metric) -> float:
    """The paper's metric: the mean over samples of d(pred_i, target_i)². pred and target: integer label
    ids in [0, metric.num_labels) (no negative indexing), as many of each, at least one."""
    pred = _search.check_labels(torch.as_tensor(pred).reshape(-1), metric.num_labels, "pred")
    target = _search.check_labels(torch.as_tensor(target).reshape(-1), metric.num_labels, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must hold as many labels, got {pred.numel()} and {target.numel()}")
    return float((metric.distance(pred, target).double() ** 2).mean())


__all__ = ["DenseMetric", "EmbeddingMetric", "GraphMetric", "Loki", "Metric", "TreeMetric",
           "expected_squared_distance"]
