"""Mamba's selective state space model with mamba_ssm's contracts: `selective_scan_fn`, the scan over
a whole sequence (differentiable), and `selective_state_update`, the single-token decode step
(Mamba-1 and Mamba-2 layouts). Kernels: csrc/selective_scan/.

Per channel: dt = softplus(dt + dt_bias) (or dt + dt_bias); state ← exp(dt·A)·state + dt·B·x;
out = Σ_n C·state + D·x, times silu(z) when z is given. `state` is updated in place.
"""

from __future__ import annotations

import torch

from shammie._checks import batch_vector, same_device, same_dtype
from shammie._functorch import register_vmap_by_loop, transformable, under_transform, vmap_by_folding


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                           z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                           dt_softplus: bool = False, state_batch_indices: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step.

    Mamba-1: state (batch, dim, dstate); x, dt, z (batch, dim); A (dim, dstate); B, C (batch, dstate);
    D, dt_bias (dim,). Mamba-2: state (batch, nheads, dim, dstate); x, dt, z (batch, nheads, dim);
    A (nheads, dim, dstate); B, C (batch, ngroups, dstate); D, dt_bias (nheads, dim).
    x, dt, z, B, C share a dtype; state has that dtype or float32; math in float32 (float64 for float64).
    Returns out shaped like x; `state` is updated in place (its version counter bumped; a state
    requiring grad is refused under grad mode). No derivative: a backward through out raises.

    Continuous batching (mamba_ssm's `state_batch_indices`, (batch,) int32/int64): state is a cache of
    any number of rows and element b updates row state_batch_indices[b]; −1 marks a padding element
    (no state touched, out zero); a row named twice is an error. Checked on the host: on a GPU one small
    copy and a sync per call, skipped while a CUDA graph is captured (rows outside the cache then act as
    padding).
    """
    return torch.ops.shammie.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                                    state_batch_indices)


@torch.library.register_fake("shammie::selective_state_update")
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices=None):
    op = "selective_state_update"
    if state.dim() not in (3, 4):
        raise ValueError(f"{op}: state must be (batch, dim, dstate) or (batch, nheads, dim, dstate), got {tuple(state.shape)}")
    expected = tuple(state.shape[:-1])
    if state_batch_indices is not None and x.dim() > 0:   # state is a cache of any number of rows
        expected = (x.shape[0],) + expected[1:]
        batch_vector(op, "state_batch_indices", state_batch_indices, "x", x)
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != expected:
            raise ValueError(f"{op}: {name} must have shape {expected}, got {tuple(t.shape)}")
    same_dtype(op, "x", x, (("dt", dt), ("B", B), ("C", C), ("z", z)))
    same_device(op, "x", x, (("state", state), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                             ("dt_bias", dt_bias)))
    if state.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{op}: state must have x's dtype ({x.dtype}) or float32, got {state.dtype}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_MAX_DSTATE = 256
_SUB_CHUNK = 32


def checkpoint_interval(dstate: int) -> int:
    """Steps between the states the forward saves for the backward (csrc/selective_scan/selective_scan.h)."""
    return _SUB_CHUNK * ((dstate + 15) // 16)


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                      delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                      return_last_state: bool = False):
    """Selective scan over the sequence, mamba_ssm's contract.

    u, delta, z: (batch, dim, L), one dtype (float32, float16, bfloat16 or float64); A: (dim, N), real,
    1 ≤ N ≤ 256; B, C: (dim, N) constant, (batch, N, L) variable or (batch, G, N, L) grouped with
    dim % G == 0; D, delta_bias: (dim,). Math and state in float32 (float64 for float64 inputs).
    Returns out (batch, dim, L) in u's dtype, and with `return_last_state` also the final state
    (batch, dim, N) in float32. Differentiable in every tensor argument, including through the last state.
    """
    scan = _Transformable.apply if under_transform() else torch.ops.shammie.selective_scan   # torch.func transforms
    out, checkpoints = scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if return_last_state:
        # A copy, as mamba_ssm's own tensor: a view would keep every checkpoint alive for as long as the
        # caller holds the state (a decode cache), and a decode step writing it in place would overwrite
        # a checkpoint that autograd saved for the backward.
        return out, checkpoints[:, :, -1].clone()
    return out


def _scan_backward(grads, inputs, outputs):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    d = torch.ops.shammie.selective_scan_backward(grads[0], grads[1], u, delta, A, B, C, D, z, delta_bias, outputs[1],
                                                  delta_softplus)
    # dD and d(delta_bias) come in the accumulation dtype; dz is empty without z.
    optional = [(D, d[5].to(D.dtype) if D is not None else None), (z, d[6]),
                (delta_bias, d[7].to(delta_bias.dtype) if delta_bias is not None else None)]
    return (*d[:5], *(grad for given, grad in optional if given is not None))


_Transformable = transformable("selective_scan", torch.ops.shammie.selective_scan, _scan_backward)


@torch.library.register_vmap("shammie::selective_scan")
def _(info, in_dims, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    # u, delta, z and a variable or grouped B / C have the batch first (not a constant (dim, N) B / C;
    # a vmapped tensor has one dim more than the op sees)
    activations = {0, 1, 6} | {i for i, t in ((3, B), (4, C)) if t.dim() - (in_dims[i] is not None) > 2}
    return vmap_by_folding(torch.ops.shammie.selective_scan, info, in_dims,
                           (u, delta, A, B, C, D, z, delta_bias, delta_softplus), activations)


register_vmap_by_loop("selective_scan_backward")


def _check_scan(op, u, delta, A, B, C, D, z, delta_bias):
    """The checks of csrc/selective_scan/selective_scan.cpp, for fake tensors."""
    if u.dim() != 3:
        raise ValueError(f"{op}: u must be 3-D (batch, dim, seqlen), got a tensor of shape {tuple(u.shape)}")
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{op}: u must be float32, float16, bfloat16 or float64, got {u.dtype}")
    batch, dim, seqlen = u.shape
    same_device(op, "u", u, (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                             ("delta_bias", delta_bias)))
    for name, t in (("delta", delta), ("z", z)):
        if t is None:
            continue
        if t.shape != u.shape:
            raise ValueError(f"{op}: {name} must have shape (batch, dim, seqlen) like u = {tuple(u.shape)}, got {tuple(t.shape)}")
        same_dtype(op, "u", u, ((name, t),))
    if A.is_complex():
        raise TypeError(f"{op}: complex A is not supported (only real A, B, C)")
    if A.dim() != 2 or A.shape[0] != dim or not 1 <= A.shape[1] <= _MAX_DSTATE:
        raise ValueError(f"{op}: A must have shape (dim, dstate) with dim = {dim} and 1 <= dstate <= {_MAX_DSTATE}, got {tuple(A.shape)}")
    dstate = A.shape[1]
    groups = set()
    for name, t in (("B", B), ("C", C)):
        if t.is_complex():
            raise TypeError(f"{op}: complex {name} is not supported (only real A, B, C)")
        if t.dim() == 2:
            expected = (dim, dstate)
        elif t.dim() in (3, 4):
            g = t.shape[1] if t.dim() == 4 else 1
            if g < 1 or dim % g:
                raise ValueError(f"{op}: dim ({dim}) must be a multiple of {name}'s ngroups ({g})")
            groups.add(g)
            expected = (batch, g, dstate, seqlen) if t.dim() == 4 else (batch, dstate, seqlen)
        else:
            raise ValueError(f"{op}: {name} must be (dim, dstate), (batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen), got {tuple(t.shape)}")
        if tuple(t.shape) != expected:
            raise ValueError(f"{op}: {name} must have shape {expected}, got {tuple(t.shape)}")
    if len(groups) > 1:
        raise ValueError(f"{op}: B and C must have the same ngroups, got {sorted(groups)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{op}: {name} must have shape (dim,) = ({dim},), got {tuple(t.shape)}")
    return batch, dim, seqlen, dstate


def _accumulation_dtype(u):
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _num_checkpoints(seqlen, dstate):
    interval = checkpoint_interval(dstate)
    return max(1, -(-seqlen // interval))


@torch.library.register_fake("shammie::selective_scan")
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, seqlen, dstate = _check_scan("selective_scan", u, delta, A, B, C, D, z, delta_bias)
    checkpoints = u.new_empty((batch, dim, _num_checkpoints(seqlen, dstate), dstate), dtype=_accumulation_dtype(u))
    return torch.empty_like(u, memory_format=torch.contiguous_format), checkpoints


@torch.library.register_fake("shammie::selective_scan_backward")
def _(grad_out, grad_checkpoints, u, delta, A, B, C, D, z, delta_bias, checkpoints, delta_softplus):
    _, dim, _, _ = _check_scan("selective_scan", u, delta, A, B, C, D, z, delta_bias)
    act = lambda: torch.empty_like(u, memory_format=torch.contiguous_format)
    acc = _accumulation_dtype(u)
    return [act(), act(), torch.empty_like(A), torch.empty_like(B, memory_format=torch.contiguous_format),
            torch.empty_like(C, memory_format=torch.contiguous_format), u.new_empty((dim,), dtype=acc),
            act() if z is not None else u.new_empty((0,)), u.new_empty((dim,), dtype=acc)]


# Autograd is registered in C++: csrc/selective_scan/selective_scan_autograd.cpp (csrc/common/autograd.h says why).
