"""Weak supervision over metric label spaces with shammie.ws, on synthetic labeling functions (LFs) with
known accuracies θ: p(λ_a | y) ∝ exp(−θ_a·d²(λ_a, y)), y uniform.

1. A tree (the 27 leaves of a ternary tree, a Loki TreeMetric), rankings of 5 items (Kendall τ) and a line (21 points):
   the relative error of θ̂ at n = 10², 10³, 10⁴ for the three estimators (additive triplets, inner-product
   triplets, moment matching under the model), and the pseudolabels' mean squared distance to y against
   majority vote, the oracle (the same inference with the true θ) and the best single LF on its rows.
2. Binary and 3-class LFs: accuracy recovery (mean |P̂(λ_a = y) − P(λ_a = y)|), pseudolabel accuracy
   and fit time against snorkel's LabelModel and flyingsquid (binary), when they import (they are not
   shammie dependencies: see the README for the venv that runs them).
3. Real-valued LFs: ContinuousLabelModel against the mean vote and the true-covariance oracle.

    python examples/ws_metric.py [--seeds 3] [--n 100 1000 10000]
"""

from __future__ import annotations

import argparse
import time

import torch

from shammie.loki import TreeMetric
from shammie.ws import (ContinuousLabelModel, MetricLabelModel, RankingMetric, expected_sq_dists, majority_vote,
                        sample_lfs, sq_block)

IDENTITIES = ("additive", "inner", "model")


def tree_metric(branching=3, depth=3):
    """The leaves of a complete tree (27 for a ternary tree of depth 3) as a Loki TreeMetric."""
    n = (branching ** (depth + 1) - 1) // (branching - 1)
    parent = torch.cat([torch.tensor([-1]), (torch.arange(1, n) - 1) // branching])
    first_leaf = n - branching ** depth
    return TreeMetric(parent, labels=torch.arange(first_leaf, n))


def line_sq_dists(N=21):
    x = torch.arange(N, dtype=torch.float32)
    return (x[:, None] - x[None, :]) ** 2


def sq_dist_matrix(metric):
    return metric if isinstance(metric, torch.Tensor) else sq_block(metric)


def best_single_lf(D, L, y):
    """The lowest mean d²(λ_a, y) of any LF over the rows it votes on."""
    best = float("inf")
    for a in range(L.shape[1]):
        v = L[:, a] >= 0
        if v.any():
            best = min(best, D[L[v, a], y[v]].mean().item())
    return best


def metric_spaces(args):
    spaces = {
        "tree": (tree_metric(), torch.tensor([0.3, 0.2, 0.1, 0.15, 0.05, 0.25, 0.08])),
        "rankings": (RankingMetric(5), torch.tensor([0.3, 0.2, 0.1, 0.15, 0.05, 0.12])),
        "line": (line_sq_dists(), torch.tensor([0.05, 0.1, 0.02, 0.2, 0.08, 0.03])),
    }
    print("## Metric label spaces (abstain rate 0.2; θ error = mean_a |θ̂_a − θ_a|/θ_a, θ_a := 1/E d²_a for "
          f"additive/inner, the model's θ for model; {args.seeds} seeds, mean)\n")
    print("| space | n | θ err additive | θ err inner | θ err model | E d² additive | E d² inner | E d² model "
          "| majority vote | oracle | best LF |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (metric, theta) in spaces.items():
        D = sq_dist_matrix(metric)
        target = {"model": theta.double(), "additive": 1 / expected_sq_dists(metric, theta),
                  "inner": 1 / expected_sq_dists(metric, theta)}
        for n in args.n:
            acc = {}
            for seed in range(args.seeds):
                L, y = sample_lfs(metric, theta, n, abstain=0.2, generator=torch.Generator().manual_seed(seed))
                keep = (L >= 0).any(1)
                L, y = L[keep], y[keep]
                row = {}
                for ident in IDENTITIES:
                    lm = MetricLabelModel(metric, identity=ident).fit(L)
                    t = target[ident]
                    row[f"err_{ident}"] = ((lm.accuracies().double() - t).abs() / t).mean().item()
                    row[f"ed2_{ident}"] = D[lm.predict(L), y].mean().item()
                row["mv"] = D[majority_vote(L, D.shape[0]), y].mean().item()
                row["oracle"] = D[MetricLabelModel(metric).set_accuracies(theta).predict(L), y].mean().item()
                row["best"] = best_single_lf(D, L, y)
                for key, v in row.items():
                    acc[key] = acc.get(key, 0.0) + v / args.seeds
            print(f"| {name} | {n} | " + " | ".join(f"{acc['err_' + i]:.3f}" for i in IDENTITIES) + " | "
                  + " | ".join(f"{acc['ed2_' + i]:.2f}" for i in IDENTITIES)
                  + f" | {acc['mv']:.2f} | {acc['oracle']:.2f} | {acc['best']:.2f} |")
    print()


def timed(fn, reps=3):
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def peers_available():
    peers = {}
    try:
        from snorkel.labeling.model import LabelModel as SnorkelLabelModel
        peers["snorkel"] = SnorkelLabelModel
    except ImportError as e:
        print(f"(snorkel not importable: {e}; skipped)")
    try:
        from flyingsquid.label_model import LabelModel as FlyingSquidLabelModel
        peers["flyingsquid"] = FlyingSquidLabelModel
    except ImportError as e:
        print(f"(flyingsquid not importable: {e}; skipped)")
    return peers


def classes(args):
    import numpy as np

    peers = peers_available()
    print("## Binary and multiclass (no abstains; accuracy = P(λ_a = y); MAE over LFs; fit time best of 3, "
          f"ms; {args.seeds} seeds, mean; n = {args.n[-1]})\n")
    print("| classes | method | accuracy MAE | pseudolabel accuracy | fit ms |")
    print("|---:|---|---:|---:|---:|")
    n = args.n[-1]
    for k in (2, 3):
        D = 1.0 - torch.eye(k)
        theta = torch.tensor([2.0, 1.2, 0.8, 1.5, 0.6, 1.0, 2.5, 0.9, 1.3, 0.7])
        true_acc = (1 - expected_sq_dists(D, theta)).numpy()
        res = {}

        def add(method, acc_hat, pred, seconds, y):
            r = res.setdefault(method, [0.0, 0.0, 0.0])
            r[0] += float(np.abs(np.asarray(acc_hat, dtype=np.float64) - true_acc).mean()) / args.seeds
            r[1] += float((np.asarray(pred) == y.numpy()).mean()) / args.seeds
            r[2] += seconds * 1e3 / args.seeds

        for seed in range(args.seeds):
            L, y = sample_lfs(D, theta, n, generator=torch.Generator().manual_seed(100 + seed))
            for ident in ("additive", "inner", "model"):
                lm, sec = timed(lambda: MetricLabelModel(D, identity=ident).fit(L))
                add(f"shammie {ident}", 1 - lm.expected_sq_dists_.numpy(), lm.predict(L).numpy(), sec, y)
            Ln = L.numpy()
            if "snorkel" in peers:
                def fit_snorkel():
                    m = peers["snorkel"](cardinality=k, verbose=False)
                    m.fit(Ln, n_epochs=500, seed=seed, progress_bar=False)
                    return m
                m, sec = timed(fit_snorkel)
                add("snorkel LabelModel", m.get_weights(), m.predict(Ln), sec, y)
            if "flyingsquid" in peers and k == 2:
                Lpm = 2 * Ln - 1  # flyingsquid: ±1 votes, 0 = abstain

                def fit_fs():
                    m = peers["flyingsquid"](Ln.shape[1])
                    m.fit(Lpm)
                    return m
                m, sec = timed(fit_fs)
                add("flyingsquid", m.estimated_accuracies(), (m.predict(Lpm).reshape(-1) + 1) // 2, sec, y)
        for method, (mae, acc, ms) in res.items():
            print(f"| {k} | {method} | {mae:.4f} | {acc:.4f} | {ms:.1f} |")
    print()


def continuous(args):
    print("## Real-valued LFs (ContinuousLabelModel; Var(y) = 4 given; abstain rate 0.2)\n")
    print("| n | MSE ours | MSE mean vote | MSE oracle | max |ρ̂ − ρ| |")
    print("|---:|---:|---:|---:|---:|")
    sig = torch.tensor([0.5, 1.0, 2.0, 0.8, 3.0], dtype=torch.float64)
    for n in args.n:
        g = torch.Generator().manual_seed(7)
        y = 3.0 + 2.0 * torch.randn(n, generator=g, dtype=torch.float64)
        L = y[:, None] + sig * torch.randn(n, sig.numel(), generator=g, dtype=torch.float64)
        L[torch.rand(n, sig.numel(), generator=g) < 0.2] = float("nan")
        lm = ContinuousLabelModel(y_var=4.0).fit(L)
        pred = lm.predict(L).double()
        prec = torch.where(torch.isfinite(L), 1 / sig ** 2, torch.zeros(1, dtype=torch.float64))
        oracle = (3.0 / 4.0 + (torch.nan_to_num(L) * prec).sum(1)) / (1 / 4.0 + prec.sum(1))
        mean_vote = torch.nan_to_num(torch.nanmean(L, 1), nan=3.0)
        rho = 2.0 / (4.0 + sig ** 2).sqrt()
        print(f"| {n} | {((pred - y) ** 2).mean():.3f} | {((mean_vote - y) ** 2).mean():.3f} | "
              f"{((oracle - y) ** 2).mean():.3f} | {(lm.accuracies().double() - rho).abs().max():.3f} |")
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000, 10000])
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    metric_spaces(args)
    classes(args)
    continuous(args)


if __name__ == "__main__":
    main()
