"""Loki's search on WordNet's noun tree (82,115 synsets): the ImageNet-1k classes observed (K = 1000),
the ImageNet-21k classes as candidates (21,844 with the 1k), B = 1024 samples. Ours: the exact tree
search (shammie.tree_frechet_topk on TreeMetric's plan, built once per observed set). Peer: the dense
method of Loki's research code, argmin over candidates of probs @ D² with the K × N squared-distance
matrix prebuilt. A second case times the one-off setup of each: our plan against building D².
Skipped (no cases) without wordnet-base and timm's synset lists."""

from __future__ import annotations

import functools

import torch

from shammie.benchmarks.harness import Case
from shammie.loki import TreeMetric, wordnet

BATCH = 1024


@functools.lru_cache(maxsize=1)
def wordnet_setup():
    """(metric, observed (1000,), candidate label ids (21844,)), labels = all noun synsets."""
    import numpy as np

    tree = wordnet.load_noun_tree()
    observed = tree.nodes_of(wordnet.imagenet_wnids("1k"))
    candidates = np.union1d(tree.nodes_of(wordnet.imagenet_wnids("21k")), observed)
    return TreeMetric(tree.parent), torch.from_numpy(observed), torch.from_numpy(candidates)


def _mask(metric, candidates):
    mask = torch.zeros(metric.num_labels, dtype=torch.bool)
    mask[candidates] = True
    return mask


def _search_case(dtype) -> Case:
    metric, observed, candidates = wordnet_setup()
    mask = _mask(metric, candidates)
    sq = metric.sq_dists(observed, candidates)   # (K, 21844), the dense method's matrix

    def make_inputs(device):
        g = torch.Generator().manual_seed(0)
        return [torch.softmax(4 * torch.randn(BATCH, observed.shape[0], generator=g), dim=1).to(device=device, dtype=dtype)]

    def ours(probs):
        p = metric.plan(observed, mask, 1, probs.device)
        return torch.ops.shammie.tree_frechet_topk(probs, p["parent"], p["edge"], p["depth"], p["obs_pos"],
                                                   p["cand_t"], p["cand_label"], 1)[1][:, 0]

    def peer(probs):
        d2 = sq.to(device=probs.device, dtype=probs.dtype)
        return candidates.to(probs.device)[torch.argmin(probs @ d2, dim=1)]

    K, N = sq.shape
    size = torch.empty((), dtype=dtype).element_size()
    return Case(op="loki tree search (k=1)", shape=f"WordNet n=82115 K={K} (IN-1k) cand={N} (IN-21k) B={BATCH}",
                dtype=dtype, make_inputs=make_inputs, ours=ours, peer=peer,
                peer_name="Loki's dense method: argmin(probs @ D²), D² (K x N) prebuilt",
                bytes_forward=size * BATCH * K, bytes_backward=0, flops_forward=0.0,  # the dense flops would flatter us
                flops_backward=0.0, backward=False)


def _setup_case() -> Case:
    metric, observed, candidates = wordnet_setup()
    mask = _mask(metric, candidates)

    def ours(_):
        metric._plans.clear()
        return metric.plan(observed, mask, 1, torch.device("cpu"))["parent"]

    return Case(op="loki setup per observed set", shape="WordNet K=1000 cand=21844: tree plan vs D² (K x N) build",
                dtype=torch.float64, make_inputs=lambda device: [torch.zeros(1)], ours=ours,
                peer=lambda _: metric.sq_dists(observed, candidates), peer_name="building D² (K x N) from the tree",
                bytes_forward=0, bytes_backward=0, flops_forward=0.0, flops_backward=0.0, backward=False)


def cases(device: torch.device, dtypes=None) -> list[Case]:
    if not wordnet.available():
        return []
    dtypes = dtypes or [torch.float32]
    out = [_search_case(dtype) for dtype in dtypes]
    if device.type == "cpu":
        out.append(_setup_case())
    return out
