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


def sequence_runs(seq_idx_row):
    """(start, end) of each run of equal consecutive ids in a 1-D seq_idx: the packed sequences."""
    ids = seq_idx_row.tolist()
    starts = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]]
    return list(zip(starts, starts[1:] + [len(ids)]))


def causal_conv1d_packed_reference(x, weight, bias, seq_idx, activation=None, initial_states=None):
    """Packed sequences as what they mean: each run of equal seq_idx convolved on its own from zeros
    (the first run of a row from initial_states when given), concatenated."""
    rows = []
    for b in range(x.shape[0]):
        parts = []
        for start, end in sequence_runs(seq_idx[b]):
            piece = x[b : b + 1, :, start:end]
            if start == 0 and initial_states is not None:
                history = initial_states.shape[-1]
                piece = torch.cat([initial_states[b : b + 1], piece], dim=-1)
                parts.append(causal_conv1d_reference(piece, weight, bias, activation)[..., history:])
            else:
                parts.append(causal_conv1d_reference(piece, weight, bias, activation))
        rows.append(torch.cat(parts, dim=-1))
    return torch.cat(rows, dim=0)


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


def causal_conv1d_varlen_states_reference(x, cu_seqlens, state_len):
    """causal-conv1d's reference for causal_conv1d_varlen_states, written from its contract: one slice
    copy per sequence (its last state_len tokens, zero-padded on the left), into (num_seqs, dim, state_len)."""
    bounds = cu_seqlens.tolist()
    states = x.new_zeros(len(bounds) - 1, state_len, x.shape[1]).transpose(1, 2)
    for s, (start, end) in enumerate(zip(bounds, bounds[1:])):
        take = min(end - start, state_len)
        if take:
            states[s, :, state_len - take:] = x[end - take:end].T
    return states
