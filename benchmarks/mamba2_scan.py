"""mamba_chunk_scan_combined (Mamba-2's SSD scan) on a Mamba2-130M layer (24 heads of 64, N 128,
1 group, with D, dt_bias and softplus, as HF's Mamba2Mixer calls it) against the best peer present:
mamba_ssm's Triton SSD kernels where they import (CUDA), else HF transformers' own torch path for
`mamba_chunk_scan_combined` (the chunked SSD written in einsums, chunk 256), which is what HF runs
without mamba_ssm and on every CPU."""

from __future__ import annotations

import torch

import shammie
from shammie.benchmarks.harness import Case

# (name, batch, L, heads, headdim, N, groups)
SHAPES = {"cpu": [("Mamba2-130M layer", 2, 512, 24, 64, 128, 1)],
          "cuda": [("Mamba2-130M layer", 8, 2048, 24, 64, 128, 1)]}
FULL_SHAPE = ("Mamba2-130M layer", 2, 2048, 24, 64, 128, 1)   # `--ops mamba2_scan_full`: the CPU table's shape at L 2048
CHUNK = 256


def _peer():
    """(name, fn(x, dt, A, B, C, D, dt_bias) -> out)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as ssd

        def mamba_ssm_scan(x, dt, A, B, C, D, dt_bias):
            return ssd(x, dt, A, B, C, CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True)

        return "mamba_ssm's mamba_chunk_scan_combined (Triton SSD)", mamba_ssm_scan
    except ImportError:
        pass
    from transformers.models.mamba2 import modeling_mamba2

    fn = getattr(modeling_mamba2.mamba2_chunk_scan, "__wrapped__", modeling_mamba2.mamba2_chunk_scan)
    if fn.__module__ != modeling_mamba2.__name__:
        raise RuntimeError("transformers' mamba2_chunk_scan is patched; benchmark outside use_shammie_kernels()")

    def hf_scan(x, dt, A, B, C, D, dt_bias):   # HF returns float32; a caller casts back to x's dtype
        return fn(x, dt, A, B, C, CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True).to(x.dtype)

    return "HF transformers' mamba2_chunk_scan torch path (chunked SSD in einsums)", hf_scan


def _case(name, batch, L, heads, headdim, N, groups, dtype) -> Case:
    def make_inputs(device):
        g = torch.Generator().manual_seed(0)
        act = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
        A = -torch.arange(1, heads + 1, dtype=torch.float32)                         # HF's A_log init
        dt_bias = torch.log(torch.expm1(torch.empty(heads).uniform_(1e-3, 1e-1, generator=g)))
        return [act(batch, L, heads, headdim), act(batch, L, heads) * 0.1, A.to(device), act(batch, L, groups, N),
                act(batch, L, groups, N), torch.ones(heads, device=device), dt_bias.to(device)]

    def ours(x, dt, A, B, C, D, dt_bias):
        return shammie.mamba_chunk_scan_combined(x, dt, A, B, C, CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True)

    peer_name, peer = _peer()
    size = torch.empty((), dtype=dtype).element_size()
    activations, bc = batch * L * heads * headdim, batch * L * groups * N
    return Case(
        op="mamba_chunk_scan_combined", shape=f"{name} B={batch} L={L} H={heads} P={headdim} N={N} G={groups}",
        dtype=dtype, make_inputs=make_inputs, ours=ours, peer=peer, peer_name=peer_name,
        # reads of x, dt, B, C and the write of out; the backward reads those and grad_out and writes
        # dx, ddt, dB, dC
        bytes_forward=size * (2 * activations + batch * L * heads + 2 * bc),
        bytes_backward=size * (3 * activations + 2 * batch * L * heads + 4 * bc),
        flops_forward=7.0 * activations * N, flops_backward=16.0 * activations * N)


def cases(device: torch.device, dtypes=None, shapes=None) -> list[Case]:
    dtypes = dtypes or ([torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32])
    return [_case(*shape, dtype) for dtype in dtypes for shape in shapes or SHAPES[device.type]]
