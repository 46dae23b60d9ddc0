"""Fréchet-mean search (Loki's dense prediction) at the issue's shape, B = 1024 rows of
probabilities over K = 1000 observed classes, N = 20,000 candidate labels.

CPU: against torch's `argmin(probs @ sq_dists)` (and `topk` for k = 5), the same work through one
MKL GEMM and a (B, N) score matrix; the harness also reports each side's peak extra memory.
CUDA: against the cuBLAS matmul alone (probs @ sq_dists), counting 2·B·K·N flops for both.
"""

from __future__ import annotations

import torch

import shammie
from shammie.benchmarks.harness import Case

# (name, batch, observed K, labels N, k)
CPU_SHAPES = [("Loki dense", 1024, 1000, 20_000, 1), ("Loki dense", 256, 1000, 20_000, 5)]
CUDA_SHAPES = [("Loki dense", 1024, 1000, 20_000, 1), ("Loki dense", 8192, 1000, 20_000, 1),
               ("Loki dense", 8192, 1000, 20_000, 5)]


def _case(name, batch, K, N, k, dtype, cuda: bool) -> Case:
    size = torch.empty((), dtype=dtype).element_size()

    def make_inputs(device):
        g = torch.Generator().manual_seed(0)
        probs = torch.softmax(3 * torch.randn(batch, K, generator=g), dim=1)
        sq_dists = 4 * torch.rand(K, N, generator=g)
        return [probs.to(device, dtype), sq_dists.to(device, dtype)]

    if cuda:
        peer, peer_name = (lambda p, d: p @ d), "cuBLAS matmul probs @ sq_dists alone (no search)"
    elif k == 1:
        peer, peer_name = (lambda p, d: torch.argmin(p @ d, dim=1)), "torch argmin(probs @ sq_dists), as Loki's code"
    else:
        peer = lambda p, d: torch.topk(p @ d, k, dim=1, largest=False)
        peer_name = "torch topk(probs @ sq_dists, k, largest=False)"
    return Case(
        op=f"frechet_topk (k={k})", shape=f"{name} B={batch} K={K} N={N}", dtype=dtype,
        make_inputs=make_inputs, ours=lambda p, d: shammie.frechet_topk(p, d, k), peer=peer, peer_name=peer_name,
        bytes_forward=size * (batch * K + K * N) + 16 * batch * k, bytes_backward=0,
        flops_forward=2.0 * batch * K * N, flops_backward=0.0, backward=False, memory=True)


def cases(device: torch.device, dtypes=None) -> list[Case]:
    cuda = device.type == "cuda"
    shapes = CUDA_SHAPES if cuda else CPU_SHAPES
    dtypes = dtypes or ([torch.float16, torch.bfloat16, torch.float32] if cuda else [torch.float32])
    return [_case(*shape, dtype, cuda) for dtype in dtypes for shape in shapes]
