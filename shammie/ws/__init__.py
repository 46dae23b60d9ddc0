"""Weak supervision over metric label spaces: label models whose inference is the Fréchet-mean search.

    from shammie.ws import MetricLabelModel, RankingMetric
    lm = MetricLabelModel(RankingMetric(5)).fit(L)      # L: (n, m) int64 label ids, -1 = abstain
    y_hat = lm.predict(L)                                # argmin_y Σ_a θ_a·d²(λ_a, y)
"""

from shammie.ws.label_model import ContinuousLabelModel, MetricLabelModel, majority_vote
from shammie.ws.metric import RankingMetric, as_metric, frechet_search, pseudo_euclidean_embedding, sq_block
from shammie.ws.synthetic import expected_sq_dists, sample_lfs

__all__ = ["ContinuousLabelModel", "MetricLabelModel", "RankingMetric", "as_metric", "expected_sq_dists",
           "frechet_search", "majority_vote", "pseudo_euclidean_embedding", "sample_lfs", "sq_block"]
