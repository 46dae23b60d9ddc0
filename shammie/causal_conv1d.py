"""Causal depthwise conv1d, causal-conv1d's contract: the public functions and fakes (autograd: in C++;
under torch.func transforms, shammie/_functorch.py).

out[b, d, t] = act(bias[d] + Σ_w weight[d, w] · x[b, d, t − (W − 1) + w]), x (batch, dim, seqlen),
weight (dim, W), act = SiLU or identity; with packed sequences (seq_idx) a tap reads only inputs of
the output's own sequence. `causal_conv1d_update` is the decode step: the same window
over [conv_state, x], with x shifted into conv_state in place. Kernels: csrc/causal_conv1d/.
"""

from __future__ import annotations

import torch

from shammie._checks import batch_vector, same_dtype_and_device
from shammie._checks import seq_idx as check_seq_idx
from shammie._functorch import register_vmap_by_loop, transformable, under_transform, vmap_by_folding

_FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _silu(activation: str | None) -> bool:
    if activation in (None, "silu", "swish"):
        return activation is not None
    raise ValueError(f"causal_conv1d: activation must be None, 'silu' or 'swish', got {activation!r}")


def _conv(x, weight, bias, silu, seq_idx):
    if under_transform():   # torch.func.grad, vjp, jacrev, vmap over them
        return _Transformable.apply(x, weight, bias, silu, seq_idx)
    return torch.ops.shammie.causal_conv1d(x, weight, bias, silu, seq_idx)


def _conv_backward(grads, inputs, outputs):
    x, weight, bias, silu, seq_idx = inputs
    dx, dweight, dbias = torch.ops.shammie.causal_conv1d_backward(grads[0], x, weight, bias, silu, seq_idx)
    return (dx, dweight) if bias is None else (dx, dweight, dbias)


_Transformable = transformable("causal_conv1d", torch.ops.shammie.causal_conv1d, _conv_backward)


@torch.library.register_vmap("shammie::causal_conv1d")
def _(info, in_dims, x, weight, bias, silu, seq_idx=None):
    args = (x, weight, bias, silu, seq_idx)[:len(in_dims)]
    return vmap_by_folding(torch.ops.shammie.causal_conv1d, info, in_dims, args, {0, 4})   # x, seq_idx: rows


register_vmap_by_loop("causal_conv1d_backward")


def causal_conv1d_fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     seq_idx: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
                     return_final_states: bool = False, final_states_out: torch.Tensor | None = None,
                     activation: str | None = None):
    """Causal depthwise conv1d of x (batch, dim, seqlen) with weight (dim, width) and bias (dim,),
    causal-conv1d's signature (pass `activation` by keyword: it is the last parameter).

    Any width; float32, float16, bfloat16 or float64 (one dtype for all; math in float32, or float64);
    x may be channel-last or sliced. `initial_states` (batch, dim, width − 1) are the inputs before
    x[..., 0] (zeros when absent); `return_final_states` also returns the last width − 1 inputs, which
    start the next chunk (written into `final_states_out` when given: x's shape, dtype and device).
    Differentiable in x, weight, bias and initial_states.

    Packed sequences: `seq_idx` (batch, seqlen), int32 or int64, gives each step's sequence id; a tap
    reads x only at steps with the output's id, so every sequence starts from zeros. Ids must be
    non-decreasing along each row, as mamba_ssm makes them (an id that came back after a short other
    sequence would be read across it). `initial_states` then belong to the first sequence, and the
    final states to each row's last sequence: zeros at the steps of earlier sequences (what
    causal_conv1d_varlen_states gives; causal-conv1d refuses seq_idx with either).
    """
    if isinstance(seq_idx, str):
        raise TypeError("causal_conv1d_fn: seq_idx must be a tensor or None, got a string; pass activation= by "
                        "keyword (causal-conv1d's order is x, weight, bias, seq_idx, initial_states, ...)")
    if initial_states is None and not return_final_states:
        return _conv(x, weight, bias, _silu(activation), seq_idx)
    _check("causal_conv1d_fn", x, weight, bias)
    batch, dim, _ = x.shape
    history = weight.shape[1] - 1
    if initial_states is not None:
        if tuple(initial_states.shape) != (batch, dim, history):
            raise ValueError(f"causal_conv1d_fn: initial_states must have shape (batch, dim, width - 1) = "
                             f"{(batch, dim, history)}, got {tuple(initial_states.shape)}")
        if initial_states.dtype != x.dtype or initial_states.device != x.device:
            raise TypeError(f"causal_conv1d_fn: initial_states must have x's dtype and device ({x.dtype}, "
                            f"{x.device}), got ({initial_states.dtype}, {initial_states.device})")
        # The conv of [initial_states, x] without its first width − 1 outputs: exact, and autograd
        # reaches initial_states through the concatenation (which is part of the first sequence).
        extended = torch.cat([initial_states, x], dim=-1)
        seq_ext = None
        if seq_idx is not None:
            check_seq_idx("causal_conv1d_fn", seq_idx, "x", x, batch, x.shape[2])
            seq_ext = torch.cat([seq_idx[:, :1].expand(batch, history), seq_idx], dim=1)
        out = _conv(extended, weight, bias, _silu(activation), seq_ext)[..., history:]
    else:
        extended, seq_ext = x, None
        out = _conv(x, weight, bias, _silu(activation), seq_idx)
    if not return_final_states:
        return out
    if final_states_out is not None:   # checked before anything is written, as causal-conv1d does
        if tuple(final_states_out.shape) != (batch, dim, history):
            raise ValueError(f"causal_conv1d_fn: final_states_out must have shape {(batch, dim, history)}, "
                             f"got {tuple(final_states_out.shape)}")
        if final_states_out.dtype != x.dtype or final_states_out.device != x.device:
            raise TypeError(f"causal_conv1d_fn: final_states_out must have x's dtype and device ({x.dtype}, "
                            f"{x.device}), got ({final_states_out.dtype}, {final_states_out.device})")
    start = max(extended.shape[-1] - history, 0)
    final_states = extended[..., start:]
    if seq_idx is not None and final_states.shape[-1] > 0:
        # The state continues the row's last sequence: zeros at the steps of earlier sequences, as
        # causal_conv1d_varlen_states gives (causal-conv1d refuses seq_idx with return_final_states).
        ids = seq_ext if seq_ext is not None else seq_idx
        last = (ids[:, start:] == ids[:, -1:]).unsqueeze(1)
        final_states = torch.where(last, final_states, final_states.new_zeros(()))
    else:
        # A copy, as causal-conv1d returns: a view of x would let the decode step's in-place update of
        # the state overwrite the prompt (and autograd's saved x).
        final_states = final_states.clone()
    if final_states.shape[-1] < history:   # a short first chunk: zeros before it, as the kernel assumes
        final_states = torch.nn.functional.pad(final_states, (history - final_states.shape[-1], 0))
    if final_states_out is not None:
        final_states = final_states_out.copy_(final_states)
    return out, final_states


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: str | None = None,
                         cache_seqlens: torch.Tensor | None = None,
                         conv_state_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Decode step, causal-conv1d's signature: x (batch, dim) or (batch, dim, seqlen); conv_state
    (batch, dim, state_len ≥ width − 1) is updated in place to the last state_len inputs (its version
    counter bumped; a conv_state requiring grad is refused under grad mode). Returns out, shaped like x;
    no derivative (a backward through out raises).

    Continuous batching: `conv_state_indices` (batch,) int32/int64 makes conv_state a cache of any number
    of rows, element b using row conv_state_indices[b]; −1 marks a padding element (its row is not
    touched, its out is zero); a row named twice is an error. `cache_seqlens` (batch,) makes conv_state a
    circular buffer: stream position c lives in slot c % state_len, and x starts at position
    cache_seqlens[b] (the caller advances it). Both are checked on the host: on a GPU one small copy and
    a sync per call, skipped while a CUDA graph is captured (rows outside the cache then act as padding,
    a negative length as 0).
    """
    return torch.ops.shammie.causal_conv1d_update(x, conv_state, weight, bias, _silu(activation),
                                                  conv_state_indices, cache_seqlens)


def _check(op: str, x, weight, bias, batch_dims: int = 3) -> None:
    """The checks of csrc/causal_conv1d/causal_conv1d.cpp, for fake tensors."""
    if x.dim() != batch_dims:
        layout = "(batch, dim, seqlen)" if batch_dims == 3 else "(batch, dim) or (batch, dim, seqlen)"
        raise ValueError(f"{op}: x must be {batch_dims}-D {layout}, got a tensor of shape {tuple(x.shape)}")
    if x.dtype not in _FLOATING:
        raise TypeError(f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (dim, width), got a tensor of shape {tuple(weight.shape)}")
    same_dtype_and_device(op, "x", x, (("weight", weight), ("bias", bias)))
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"{op}: weight must have shape (dim, width) with dim = {x.shape[1]} (x's dimension 1), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"{op}: bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")


@torch.library.register_fake("shammie::causal_conv1d")
def _(x, weight, bias, silu, seq_idx=None):
    _check("causal_conv1d", x, weight, bias)
    check_seq_idx("causal_conv1d", seq_idx, "x", x, x.shape[0], x.shape[2])
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("shammie::causal_conv1d_backward")
def _(grad_out, x, weight, bias, silu, seq_idx=None):
    _check("causal_conv1d_backward", x, weight, bias)
    check_seq_idx("causal_conv1d_backward", seq_idx, "x", x, x.shape[0], x.shape[2])
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            weight.new_empty((weight.shape[0],)))


@torch.library.register_fake("shammie::causal_conv1d_update")
def _(x, conv_state, weight, bias, silu, conv_state_indices=None, cache_seqlens=None):
    x3 = x.unsqueeze(-1) if x.dim() == 2 else x
    _check("causal_conv1d_update", x3, weight, bias)
    for name, t in (("conv_state_indices", conv_state_indices), ("cache_seqlens", cache_seqlens)):
        batch_vector("causal_conv1d_update", name, t, "x", x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# Autograd is registered in C++: csrc/causal_conv1d/causal_conv1d_autograd.cpp (csrc/common/autograd.h says why).
