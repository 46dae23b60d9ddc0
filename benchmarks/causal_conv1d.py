"""Causal conv1d cases on Mamba layer shapes, against the formulation HF transformers' Mamba uses
(a depthwise nn.functional.conv1d with width − 1 padding, cut to length, then SiLU; on CPU this is
oneDNN's depthwise convolution, on CUDA cuDNN's). On CUDA, where the causal-conv1d package imports
(benchmarks/device_check.sh installs a wheel built for sm_90), also against its own kernels: the
issue's real peer."""

from __future__ import annotations

import torch

import shammie
from shammie.benchmarks.harness import Case
from shammie.reference.causal_conv1d import causal_conv1d_reference, causal_conv1d_varlen_states_reference

# (name, batch, dim, seqlen, width): Mamba-130M's inner width is 1536, Mamba-1.4B's 4096.
CPU_SHAPES = [("Mamba-130M", 2, 1536, 2048, 4)]
CUDA_SHAPES = [("Mamba-130M", 8, 1536, 2048, 4), ("Mamba-1.4B", 8, 4096, 2048, 4)]


def causal_conv1d_package():
    """causal-conv1d's (causal_conv1d_fn, causal_conv1d_varlen_states), or None where it does not import."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from causal_conv1d.causal_conv1d_varlen import causal_conv1d_varlen_states
    except ImportError:
        return None
    return causal_conv1d_fn, causal_conv1d_varlen_states


def _case(name, batch, dim, seqlen, width, dtype, peer: str = "torch") -> Case:
    size = torch.empty((), dtype=dtype).element_size()

    def make_inputs(device):
        g = torch.Generator().manual_seed(0)
        tensors = (torch.randn(batch, dim, seqlen, generator=g), torch.randn(dim, width, generator=g) / width**0.5,
                   torch.randn(dim, generator=g))
        return [t.to(device=device, dtype=dtype) for t in tensors]

    elements = batch * dim * seqlen
    return Case(
        op="causal_conv1d (silu)", shape=f"{name} B={batch} D={dim} L={seqlen} W={width}", dtype=dtype,
        make_inputs=make_inputs, ours=lambda x, w, b: shammie.causal_conv1d_fn(x, w, b, activation="silu"),
        peer=(lambda x, w, b: causal_conv1d_package()[0](x, w, b, activation="silu")) if peer == "package"
        else (lambda x, w, b: causal_conv1d_reference(x, w, b, "silu")),
        peer_name=("causal-conv1d's causal_conv1d_fn (its CUDA kernels)" if peer == "package"
                   else "depthwise F.conv1d + SiLU, as HF transformers' Mamba slow path"),
        bytes_forward=size * 2 * elements, bytes_backward=size * 3 * elements,
        flops_forward=2.0 * elements * width, flops_backward=4.0 * elements * width)


def _varlen_states_case(num_seqs, total, dim, state_len, dtype, peer: str = "torch") -> Case:
    """Conv states of a packed prefill (Mamba2-130M's conv width: 1536 + 2·128 channels)."""
    size = torch.empty((), dtype=dtype).element_size()

    def make_inputs(device):
        g = torch.Generator().manual_seed(0)
        cuts = torch.randperm(total - 1, generator=g)[: num_seqs - 1].sort().values + 1
        cu_seqlens = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])])
        return [torch.randn(total, dim, generator=g).to(device=device, dtype=dtype), cu_seqlens.to(device)]

    moved = size * 2 * num_seqs * dim * state_len
    return Case(
        op="causal_conv1d_varlen_states", shape=f"packed prefill {num_seqs} seqs, {total} tokens, D={dim} "
        f"state_len={state_len}", dtype=dtype, make_inputs=make_inputs,
        ours=lambda x, cu: shammie.causal_conv1d_varlen_states(x, cu, state_len),
        peer=(lambda x, cu: causal_conv1d_package()[1](x, cu, state_len)) if peer == "package"
        else (lambda x, cu: causal_conv1d_varlen_states_reference(x, cu, state_len)),
        peer_name=("causal-conv1d's causal_conv1d_varlen_states (its Triton kernel)" if peer == "package"
                   else "causal-conv1d's reference (a slice copy per sequence; its Triton kernel is CUDA-only)"),
        bytes_forward=moved, bytes_backward=0, flops_forward=0.0, flops_backward=0.0, backward=False)


def cases(device: torch.device, dtypes=None) -> list[Case]:
    shapes = CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES
    dtypes = dtypes or ([torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32])
    peers = ["torch"] + (["package"] if device.type == "cuda" and causal_conv1d_package() else [])
    return [_case(*shape, dtype, peer) for dtype in dtypes for shape in shapes for peer in peers] + \
        [_varlen_states_case(256, 16384, 1792, 3, dtype, peer) for dtype in dtypes for peer in peers]
