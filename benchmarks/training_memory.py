"""Activation memory of the Mamba training paths: what autograd keeps for the backward, and the
fwd+bwd time, for the recomputing paths (mamba_ssm's behaviour: `mamba_inner_fn(checkpoint_lvl=1)`,
`mamba_split_conv1d_scan_combined` in eager training) against the plain composition of the same ops
(`checkpoint_lvl=0`; the composition the split mixer traces under torch.compile), side by side.

    python -m shammie.benchmarks.training_memory [--batch 2] [--seqlen 1024] [--repeats 8] [--threads N]

Mamba-130M and Mamba2-130M layer widths, fp32, random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

import shammie
from shammie.benchmarks.harness import saved_bytes


def mamba_layer(batch, seqlen):
    """mamba_inner_fn at Mamba-130M's widths; the call takes the checkpoint level."""
    dim, dstate, rank = 1536, 16, 48
    g = torch.Generator().manual_seed(0)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).requires_grad_()
    xz = r(batch, 2 * dim, seqlen)
    weights = dict(conv1d_weight=r(dim, 1, 4, scale=0.3), conv1d_bias=r(dim, scale=0.1),
                   x_proj_weight=r(rank + 2 * dstate, dim, scale=0.02), delta_proj_weight=r(dim, rank, scale=0.1),
                   out_proj_weight=r(768, dim, scale=0.02), out_proj_bias=None,
                   A=(-torch.rand(dim, dstate, generator=g)).requires_grad_(), D=r(dim), delta_bias=r(dim, scale=0.1))
    return lambda recompute: shammie.mamba_inner_fn(xz, **weights, checkpoint_lvl=1 if recompute else 0)


def mamba2_layer(batch, seqlen):
    """mamba_split_conv1d_scan_combined at Mamba2-130M's widths (gated norm after the gate, as HF)."""
    heads, headdim, dstate, groups = 24, 64, 128, 1
    dim = heads * headdim
    conv_dim = dim + 2 * groups * dstate
    g = torch.Generator().manual_seed(0)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).requires_grad_()
    zxbcdt = r(batch, seqlen, 2 * dim + 2 * groups * dstate + heads)
    weights = dict(conv1d_weight=r(conv_dim, 4, scale=0.3), conv1d_bias=r(conv_dim, scale=0.1), dt_bias=r(heads),
                   A=(-torch.rand(heads, generator=g)).requires_grad_(), D=r(heads), rmsnorm_weight=r(dim),
                   outproj_weight=r(768, dim, scale=0.02))

    def call(recompute):
        # The composition is what torch.compile traces; in eager mode it is reached the same way.
        patch = contextlib.nullcontext() if recompute else mock.patch.object(torch.compiler, "is_compiling",
                                                                             lambda: True)
        with patch:
            return shammie.mamba_split_conv1d_scan_combined(zxbcdt, **weights, chunk_size=256, headdim=headdim,
                                                            ngroups=groups, norm_before_gate=False)
    return call


LAYERS = {"mamba_inner_fn, Mamba-130M layer": mamba_layer,
          "mamba_split_conv1d_scan_combined, Mamba2-130M layer": mamba2_layer}


def run(batch: int, seqlen: int, repeats: int) -> list[dict]:
    rows = []
    for name, build in LAYERS.items():
        call = build(batch, seqlen)
        row = {"layer": name}
        for label, recompute in (("composed", False), ("recomputing", True)):
            _, kept = saved_bytes(lambda: call(recompute))
            row[f"{label}_mib"] = kept / 2**20
        times = {"composed": [], "recomputing": []}
        for _ in range(repeats):   # alternating, so load changes hit both sides
            for label, recompute in (("composed", False), ("recomputing", True)):
                start = time.perf_counter()
                call(recompute).sum().backward()
                times[label].append(time.perf_counter() - start)
        for label, values in times.items():
            row[f"{label}_s"] = statistics.median(values[1:] or values)
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"fp32 on CPU, batch {args.batch}, L {args.seqlen}, {torch.get_num_threads()} threads; "
          f"kept = autograd's saved storages; time = median fwd+bwd")
    for r in run(args.batch, args.seqlen, args.repeats):
        print(f"  {r['layer']}: kept {r['composed_mib']:.1f} -> {r['recomputing_mib']:.1f} MiB "
              f"({1 - r['recomputing_mib'] / r['composed_mib']:.0%} less); fwd+bwd {r['composed_s']:.3f} -> "
              f"{r['recomputing_s']:.3f} s ({r['recomputing_s'] / r['composed_s']:.2f}x)")


if __name__ == "__main__":
    main()
