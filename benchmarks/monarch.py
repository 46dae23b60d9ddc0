"""Monarch product cases: MoRe adapter shapes and a square Monarch, against the bmm peer
(shammie.reference.monarch.monarch_bmm, the formulation of fly and the MoRe repository)."""

from __future__ import annotations

import torch

import shammie
from shammie.benchmarks.harness import Case
from shammie.reference.monarch import monarch_bmm

# (name, tokens, n, k, q, l, s, r): MoRe adapters at blk_r = q = r on a 1024- or 4096-wide layer
# (k = l = 4 blocks, s = n/4), and a square Monarch with full-rank 32×32 blocks.
CPU_SHAPES = [
    ("MoRe n=1024 r=4", 4096, 1024, 4, 4, 4, 256, 4),
    ("MoRe n=1024 r=8", 4096, 1024, 4, 8, 4, 256, 8),
    ("MoRe n=4096 r=4", 4096, 4096, 4, 4, 4, 1024, 4),
    ("MoRe n=4096 r=8", 4096, 4096, 4, 8, 4, 1024, 8),
    ("square n=1024 b=32", 4096, 1024, 32, 32, 32, 32, 32),
]
# On a GPU: a batch of 8×2048 tokens (LLaMA-7B-like width 4096) and the same square Monarch.
CUDA_SHAPES = [
    ("MoRe n=4096 r=4", 16384, 4096, 4, 4, 4, 1024, 4),
    ("MoRe n=4096 r=8", 16384, 4096, 4, 8, 4, 1024, 8),
    ("MoRe n=11008 r=4", 16384, 11008, 4, 4, 4, 2752, 4),
    ("square n=1024 b=32", 16384, 1024, 32, 32, 32, 32, 32),
    ("square n=4096 b=64", 16384, 4096, 64, 64, 64, 64, 64),
]


def _case(name, tokens, n, k, q, l, s, r, dtype) -> Case:
    p = n // k
    size = torch.empty((), dtype=dtype).element_size()

    def make_inputs(device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, n, generator=g)
        w1 = torch.randn(k, q, p, generator=g) / p**0.5
        w2 = torch.randn(l, s, r, generator=g) / r**0.5
        return [t.to(device=device, dtype=dtype) for t in (x, w1, w2)]

    weights = k * q * p + l * s * r
    macs = tokens * weights
    return Case(
        op="blockdiag_butterfly_multiply", shape=f"{name} M={tokens}", dtype=dtype,
        make_inputs=make_inputs, ours=shammie.blockdiag_butterfly_multiply, peer=monarch_bmm,
        peer_name="bmm path of fly / MoRe (shammie.reference.monarch.monarch_bmm)",
        bytes_forward=size * (tokens * (n + l * s) + weights),
        bytes_backward=size * (tokens * (2 * n + l * s) + 2 * weights),
        flops_forward=2.0 * macs, flops_backward=4.0 * macs,
    )


def cases(device: torch.device, dtypes=None) -> list[Case]:
    shapes = CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES
    dtypes = dtypes or ([torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32])
    return [_case(*shape, dtype) for dtype in dtypes for shape in shapes]
