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


def _expand_bc(t, batch, dim, seqlen):
    """B or C as (batch, dim, N, L) from its constant, variable or grouped form."""
    if t.dim() == 2:                                   # (dim, N)
        return t[None, :, :, None].expand(batch, dim, t.shape[1], seqlen)
    if t.dim() == 3:                                   # (batch, N, L)
        return t[:, None].expand(batch, dim, *t.shape[1:])
    return t.repeat_interleave(dim // t.shape[1], dim=1)   # (batch, G, N, L)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False):
    """The recurrence step by step, in float32 (float64 for float64 inputs), out in u's dtype;
    the last state in the math dtype."""
    dtype = u.dtype
    math = torch.float64 if dtype == torch.float64 else torch.float32
    batch, dim, seqlen = u.shape
    u, delta, A = u.to(math), delta.to(math), A.to(math)
    B = _expand_bc(B.to(math), batch, dim, seqlen)
    C = _expand_bc(C.to(math), batch, dim, seqlen)
    if delta_bias is not None:
        delta = delta + delta_bias.to(math)[:, None]
    if delta_softplus:
        delta = torch.where(delta > 20, delta, F.softplus(delta))
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(seqlen):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.to(math)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(math))
    out = y.to(dtype)
    return (out, h) if return_last_state else out
