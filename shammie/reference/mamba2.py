"""Mamba-2's SSD scan in plain torch, written from the math (sequential in time): the tests' reference
for `shammie.mamba_chunk_scan_combined`.

Per (batch, head h, headdim p, state n), with g the group of head h:
    dt_t = clamp(softplus(dt_t + dt_bias_h), dt_limit)   (softplus only when asked, identity above 20;
                                                          clamp only for a limit other than (0, inf))
    s_t  = exp(dt_t·A_h)·s_{t−1} + dt_t·x_t[p]·B_t[g, n],   s_0 = initial_states (or 0)
    y_t  = Σ_n C_t[g, n]·s_t + D·x_t[p],   times silu(z_t) when z is given.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ssd_scan_reference(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
                       dt_limit=(0.0, math.inf)):
    """x, z: (batch, L, H, P); dt: (batch, L, H); A, dt_bias: (H,); B, C: (batch, L, G, N); D: (H,) or (H, P);
    initial_states: (batch, H, P, N). Returns (out in x's dtype, final state), computed in float32
    (float64 for float64 x)."""
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, seqlen, heads, headdim = x.shape
    per_group = heads // B.shape[2]
    xs, dt, A = x.to(math_dtype), dt.to(math_dtype), A.to(math_dtype)
    B = B.to(math_dtype).repeat_interleave(per_group, dim=2)            # (batch, L, H, N)
    C = C.to(math_dtype).repeat_interleave(per_group, dim=2)
    if dt_bias is not None:
        dt = dt + dt_bias.to(math_dtype)
    if dt_softplus:
        dt = torch.where(dt > 20, dt, F.softplus(dt))
    if tuple(dt_limit) != (0.0, math.inf):   # mamba_ssm clamps only for a limit set by the caller
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    state = (initial_states.to(math_dtype).clone() if initial_states is not None
             else xs.new_zeros(batch, heads, headdim, B.shape[-1]))
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]                        # (batch, H, 1, 1)
        state = decay * state + (dt[:, t, :, None] * xs[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else xs.new_zeros(batch, 0, heads, headdim)
    if D is not None:
        D = D.to(math_dtype)
        y = y + (D[:, None] if D.dim() == 1 else D) * xs
    if z is not None:
        y = y * F.silu(z.to(math_dtype))
    return y.to(x.dtype), state


def ssd_scan_packed_reference(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
                              dt_limit=(0.0, math.inf), seq_idx=None):
    """Packed sequences as what they mean: each run of equal seq_idx scanned on its own from a zero state
    (a row's first run from initial_states), outputs concatenated; the final state is each row's last
    run's. Differentiable through the slicing."""
    from shammie.reference.causal_conv1d import sequence_runs

    outs, states = [], []
    for b in range(x.shape[0]):
        row = lambda t: None if t is None else t[b : b + 1]
        pieces, state = [], None
        for start, end in sequence_runs(seq_idx[b]):
            cut = lambda t: None if t is None else t[b : b + 1, start:end]
            out, state = ssd_scan_reference(cut(x), cut(dt), A, cut(B), cut(C), D, cut(z), dt_bias,
                                            row(initial_states) if start == 0 else None, dt_softplus, dt_limit)
            pieces.append(out)
        outs.append(torch.cat(pieces, dim=1))
        states.append(state)
    return torch.cat(outs), torch.cat(states)


def ssd_scan_varlen_reference(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
                              dt_limit=(0.0, math.inf), cu_seqlens=None):
    """cu_seqlens (batch 1) as what it means: sequence s (steps cu[s] .. cu[s+1]−1) scanned on its own
    from a zero state (the first from initial_states). Returns (out, final state of the last non-empty
    sequence, each sequence's final state (num_seqs, H, P, N), zeros for an empty one)."""
    bounds = cu_seqlens.tolist()
    pieces, states, final = [], [], None
    for s, (start, end) in enumerate(zip(bounds, bounds[1:])):
        cut = lambda t: None if t is None else t[:, start:end]
        out, state = ssd_scan_reference(cut(x), cut(dt), A, cut(B), cut(C), D, cut(z), dt_bias,
                                        initial_states if s == 0 else None, dt_softplus, dt_limit)
        if end == start:
            state = torch.zeros_like(state)
        else:
            final = state
        pieces.append(out)
        states.append(state[0])
    return torch.cat(pieces, dim=1), final, torch.stack(states)
