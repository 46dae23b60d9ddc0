"""Loki on WordNet: a classifier trained on the ImageNet-1k classes predicts over the ImageNet-21k
label space, without retraining, by taking the Fréchet mean in WordNet's noun hypernym tree.

The classifier is simulated: for an image of a 21k class y its logits are −d(y, λ)²/τ plus noise,
so its mistakes are near misses in the tree. Prints the expected squared distance E d(ŷ, y)² of its
argmax (always one of the 1k classes) and of Loki (any of the 21k), and the time each step takes.

Needs `apt-get install -y wordnet-base` and `pip install --no-deps timm` (synset lists only).
Run: python examples/loki_wordnet.py [--batch 4096] [--tau 2] [--noise 1] [--dense]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import shammie
from shammie.loki import Loki, TreeMetric, expected_squared_distance, wordnet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--tau", type=float, default=2.0, help="temperature of the simulated classifier")
    ap.add_argument("--noise", type=float, default=1.0, help="std of the logits' noise")
    ap.add_argument("--dense", action="store_true", help="also time the dense method (K x N matrix, then matmul)")
    args = ap.parse_args()
    if not wordnet.available():
        raise SystemExit("needs WordNet (apt-get install -y wordnet-base) and timm's synset lists "
                         "(pip install --no-deps timm)")

    t0 = time.perf_counter()
    tree = wordnet.load_noun_tree()
    metric = TreeMetric(tree.parent)  # labels = all noun synsets, label id = node id
    observed = torch.from_numpy(tree.nodes_of(wordnet.imagenet_wnids("1k")))
    label_space = torch.from_numpy(np.union1d(tree.nodes_of(wordnet.imagenet_wnids("21k")), observed.numpy()))
    print(f"WordNet nouns: {metric.num_labels}, observed (ImageNet-1k): {observed.numpy().size}, "
          f"label space (ImageNet-21k): {label_space.numpy().size}; loaded in {time.perf_counter() - t0:.2f} s")

    gen = torch.Generator().manual_seed(0)
    target = label_space[torch.randint(0, label_space.shape[0], (args.batch,), generator=gen)]
    sq = metric.sq_dists(observed, target).T.float()                       # (B, K) d(y, λ)²
    logits = -sq / args.tau + args.noise * torch.randn(sq.shape, generator=gen)
    probs = torch.softmax(logits, dim=1)

    argmax = observed[probs.argmax(dim=1)]
    loki = Loki(metric, observed, candidates=label_space)
    t0 = time.perf_counter()
    loki.predict(probs[:1])                                                # builds the plan once
    t_plan = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = loki.predict(probs)
    t_search = time.perf_counter() - t0
    print(f"expected squared distance over {args.batch} samples: argmax {expected_squared_distance(argmax, target, metric):.2f}, "
          f"Loki {expected_squared_distance(pred, target, metric):.2f}")
    print(f"Loki: plan {t_plan * 1e3:.1f} ms (once per observed set), search {t_search * 1e3:.1f} ms "
          f"({t_search / args.batch * 1e6:.1f} us/sample, {torch.get_num_threads()} threads)")

    if args.dense:
        t0 = time.perf_counter()
        d2 = metric.sq_dists(observed, label_space).float()               # (K, N)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        dense = label_space[shammie.frechet_topk(probs, d2, k=1)[1][:, 0]]
        t_dense = time.perf_counter() - t0
        print(f"dense method: K x N build {t_build * 1e3:.1f} ms, search {t_dense * 1e3:.1f} ms; "
              f"same predictions: {bool((dense == pred).all())}")


if __name__ == "__main__":
    main()
