"""Causal conv1d in plain torch: the formulation of HF transformers' Mamba slow path and of
causal-conv1d's reference (a depthwise nn.functional.conv1d with width − 1 padding, cut to length).
The tests run it in float64; the benchmarks time it as the CPU peer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_reference(x, weight, bias=None, activation=None):
    dim, width = weight.shape
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., : x.shape[-1]]
    return F.silu(out) if activation in ("silu", "swish") else out


def causal_conv1d_update_reference(x, conv_state, weight, bias=None, activation=None):
    """Returns (out, new_state) without touching conv_state."""
    squeeze = x.dim() == 2
    x = x.unsqueeze(-1) if squeeze else x
    dim, width = weight.shape
    steps, state_len = x.shape[-1], conv_state.shape[-1]
    seq = torch.cat([conv_state, x], dim=-1)
    out = F.conv1d(seq, weight.unsqueeze(1), bias, groups=dim)[..., -steps:]
    out = F.silu(out) if activation in ("silu", "swish") else out
    return (out.squeeze(-1) if squeeze else out), seq[..., -state_len:]
