"""The Python side of csrc/common/checks.h, for fake kernels and composite functions: the same
conditions and the same words, so a compiled graph fails as the eager call does."""

from __future__ import annotations

import torch


def same_dtype(op: str, ref_name: str, ref, named) -> None:
    """Each (name, tensor) of `named` that is not None has ref's dtype."""
    for name, t in named:
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")


def same_device(op: str, ref_name: str, ref, named) -> None:
    """Each (name, tensor) of `named` that is not None is on ref's device."""
    for name, t in named:
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def same_dtype_and_device(op: str, ref_name: str, ref, named) -> None:
    """Both, tensor by tensor (a tensor wrong in both is reported for its dtype)."""
    for pair in named:
        same_dtype(op, ref_name, ref, (pair,))
        same_device(op, ref_name, ref, (pair,))


def seq_idx(op: str, ids, ref_name: str, ref, batch: int, seqlen: int) -> None:
    """seq_idx of packed sequences, if given: (batch, seqlen) int32 or int64 on ref's device."""
    if ids is None:
        return
    same_device(op, ref_name, ref, (("seq_idx", ids),))
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: seq_idx must be int32 or int64, got {ids.dtype}")
    if tuple(ids.shape) != (batch, seqlen):
        raise ValueError(f"{op}: seq_idx must have shape (batch, seqlen) = ({batch}, {seqlen}), got {tuple(ids.shape)}")


def cu_seqlens(op: str, cu, ref_name: str, ref, batch: int) -> None:
    """cu_seqlens of packed sequences, if given: (num_seqs + 1,) int32 or int64 on ref's device, batch 1.
    Its values (0 .. seqlen, non-decreasing) are checked by the kernels' front end."""
    if cu is None:
        return
    same_device(op, ref_name, ref, (("cu_seqlens", cu),))
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: cu_seqlens must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{op}: cu_seqlens must have shape (num_seqs + 1,) with num_seqs >= 1, got {tuple(cu.shape)}")
    if batch != 1:
        raise ValueError(f"{op}: cu_seqlens needs batch 1 (sequences packed along seqlen), got batch {batch}")


def batch_vector(op: str, name: str, t, ref_name: str, ref) -> None:
    """A per-batch-element int vector (state indices, cache lengths), if given: (batch,) int32 or int64
    on ref's device, batch = ref.shape[0]. Its values are checked by the kernels' front end."""
    if t is None:
        return
    same_device(op, ref_name, ref, ((name, t),))
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
    if tuple(t.shape) != (ref.shape[0],):
        raise ValueError(f"{op}: {name} must have shape (batch,) = ({ref.shape[0]},), got {tuple(t.shape)}")
