"""Mamba's selective state space model: `selective_state_update`, the single-token decode step,
with mamba_ssm's contract (Mamba-1 and Mamba-2 layouts). Kernels: csrc/selective_scan/.

Per channel: dt = softplus(dt + dt_bias) (or dt + dt_bias); state ← exp(dt·A)·state + dt·B·x;
out = Σ_n C·state + D·x, times silu(z) when z is given. `state` is updated in place.
"""

from __future__ import annotations

import torch


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                           z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                           dt_softplus: bool = False) -> torch.Tensor:
    """One decode step.

    Mamba-1: state (batch, dim, dstate); x, dt, z (batch, dim); A (dim, dstate); B, C (batch, dstate);
    D, dt_bias (dim,). Mamba-2: state (batch, nheads, dim, dstate); x, dt, z (batch, nheads, dim);
    A (nheads, dim, dstate); B, C (batch, ngroups, dstate); D, dt_bias (nheads, dim).
    x, dt, z, B, C share a dtype; state has that dtype or float32; math in float32 (float64 for float64).
    Returns out shaped like x; `state` is updated in place.
    """
    return torch.ops.shammie.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@torch.library.register_fake("shammie::selective_state_update")
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    op = "selective_state_update"
    if state.dim() not in (3, 4):
        raise ValueError(f"{op}: state must be (batch, dim, dstate) or (batch, nheads, dim, dstate), got {tuple(state.shape)}")
    expected = tuple(state.shape[:-1])
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != expected:
            raise ValueError(f"{op}: {name} must have shape {expected}, got {tuple(t.shape)}")
    for name, t in (("dt", dt), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have the same dtype as x ({x.dtype}), got {t.dtype}")
    named = (("state", state), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias))
    for name, t in named:
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} must be on the same device as x ({x.device}), got {t.device}")
    if state.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{op}: state must have x's dtype ({x.dtype}) or float32, got {state.dtype}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)
