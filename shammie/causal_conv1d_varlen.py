"""`causal_conv1d_varlen_states`: each packed sequence's conv state after a packed prefill,
causal-conv1d's contract. With `mamba_chunk_scan_combined(..., cu_seqlens=..., return_varlen_states=True)`
it turns one packed prefill into the per-sequence states that decoding (`causal_conv1d_update`,
`selective_state_update`, with state indices under continuous batching) continues from.

It is data movement only (the last state_len tokens of each sequence, zeros before a sequence's
start), so it is one batched gather in torch on either device rather than a kernel: no loop over the
sequences, no host sync inside a compiled graph, and differentiable.
"""

from __future__ import annotations

import torch

from shammie._checks import cu_seqlens as check_cu_seqlens

_OP = "causal_conv1d_varlen_states"


def causal_conv1d_varlen_states(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """x: (total_tokens, dim), the sequences packed one after another; cu_seqlens: (num_seqs + 1,) int32
    or int64, from 0 to total_tokens, non-decreasing (sequence s is x[cu[s] : cu[s+1]]). Returns
    (num_seqs, dim, state_len) in x's dtype: sequence s's last state_len tokens, zero-padded on the left
    when it is shorter, laid out with dim contiguous (what causal_conv1d_update takes as conv_state).
    cu_seqlens' values are checked on the host (from a GPU: a small copy and a sync), except inside a
    torch.compile graph."""
    if x.dim() != 2:
        raise ValueError(f"{_OP}: x must be (total_tokens, dim), got {tuple(x.shape)}")
    if isinstance(state_len, bool) or not isinstance(state_len, int) or state_len < 0:
        raise ValueError(f"{_OP}: state_len must be a non-negative int, got {state_len!r}")
    check_cu_seqlens(_OP, cu_seqlens, "x", x, 1)
    total, dim = x.shape
    if not torch.compiler.is_compiling():
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != total:
            raise ValueError(f"{_OP}: cu_seqlens must run from 0 to total_tokens ({total}), got "
                             f"{bounds[0]} .. {bounds[-1]}")
        for s, (start, end) in enumerate(zip(bounds, bounds[1:])):
            if start > end:
                raise ValueError(f"{_OP}: cu_seqlens must be non-decreasing, got cu_seqlens[{s}] = {start} > "
                                 f"cu_seqlens[{s + 1}] = {end}")
    cu = cu_seqlens.long()
    # Token positions of every state slot, (num_seqs, state_len); slots before a sequence's start are zeros.
    positions = cu[1:, None] - state_len + torch.arange(state_len, device=x.device)
    inside = positions >= cu[:-1, None]
    gathered = x[positions.clamp(0, max(total - 1, 0))] if total else x.new_zeros(*positions.shape, dim)
    return torch.where(inside[..., None], gathered, gathered.new_zeros(())).transpose(1, 2)


__all__ = ["causal_conv1d_varlen_states"]
