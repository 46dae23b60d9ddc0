"""Mamba's SSM in plain torch, written from the math (sequential in time): the tests' references."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_state_update_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Returns (out, new_state) without touching `state`; Mamba-1 or Mamba-2 layouts."""
    four_d = state.dim() == 4
    if not four_d:
        state, x, dt, A = state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0)
        B, C = B.unsqueeze(1), C.unsqueeze(1)
        z = z.unsqueeze(1) if z is not None else None
        D = D.unsqueeze(0) if D is not None else None
        dt_bias = dt_bias.unsqueeze(0) if dt_bias is not None else None
    heads, groups = state.shape[1], B.shape[1]
    B = B.repeat_interleave(heads // groups, dim=1)                  # (batch, H, N)
    C = C.repeat_interleave(heads // groups, dim=1)
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = torch.where(dt > 20, dt, F.softplus(dt))
    new_state = torch.exp(dt[..., None] * A) * state + dt[..., None] * B[:, :, None, :] * x[..., None]
    out = (new_state * C[:, :, None, :]).sum(-1)
    if D is not None:
        out = out + D * x
    if z is not None:
        out = out * F.silu(z)
    if not four_d:
        out, new_state = out.squeeze(1), new_state.squeeze(1)
    return out, new_state
