"""Selective SSM decode step (selective_state_update) against the formulation of HF transformers'
Mamba decode path (torch ops on the whole (batch, dim, N) state: exp, multiply-add, matmul with C;
shammie.reference.selective_scan.selective_state_update_reference)."""

from __future__ import annotations

import torch

import shammie
from shammie.benchmarks.harness import Case
from shammie.reference.selective_scan import selective_state_update_reference

# (name, batch, heads or None, dim, N, groups): Mamba-130M (d_inner 1536, N 16) and Mamba2-2.7B
# (80 heads of 64, N 128, 1 group) decoding a batch of 16 sequences.
SHAPES = [("Mamba-130M decode", 16, None, 1536, 16, 1), ("Mamba2-2.7B decode", 16, 80, 64, 128, 1)]


def _case(name, batch, heads, dim, N, groups, dtype) -> Case:
    lead = (batch, heads, dim) if heads else (batch, dim)
    chan = (heads, dim) if heads else (dim,)
    bc = (batch, groups, N) if heads else (batch, N)

    def make_inputs(device):
        g = torch.Generator().manual_seed(0)
        low = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
        f32 = lambda *s: torch.randn(*s, generator=g).to(device)
        A = -torch.rand(*chan, N, generator=g).to(device)
        return [low(*lead, N), low(*lead), low(*lead), A, low(*bc), low(*bc), f32(*chan), low(*lead), f32(*chan)]

    def ours(state, x, dt, A, B, C, D, z, dt_bias):
        return shammie.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)

    def peer(state, x, dt, A, B, C, D, z, dt_bias):
        out, new_state = selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
        state.copy_(new_state)
        return out

    size = torch.empty((), dtype=dtype).element_size()
    channels = batch * (heads or 1) * dim
    return Case(
        op="selective_state_update", shape=f"{name} B={batch} {'H=' + str(heads) + ' ' if heads else ''}D={dim} N={N}",
        dtype=dtype, make_inputs=make_inputs, ours=ours, peer=peer,
        peer_name="torch ops on the whole state, as HF transformers' Mamba decode path",
        bytes_forward=size * channels * (2 * N + 4), bytes_backward=0,
        flops_forward=6.0 * channels * N, flops_backward=0.0, backward=False)


def cases(device: torch.device, dtypes=None) -> list[Case]:
    dtypes = dtypes or ([torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32])
    return [_case(*shape, dtype) for dtype in dtypes for shape in SHAPES]
