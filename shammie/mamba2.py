"""`mamba_chunk_scan_combined`: Mamba-2's SSD scan with mamba_ssm's contract, on CPU and CUDA.

Mamba-2 is Mamba's selective scan with one scalar decay per head: the head's A, dt and dt_bias apply
to all of its headdim rows, and B, C are shared by the heads of a group. The kernels
(csrc/ssd/, op `shammie::ssd_scan` and its backward) run each row's recurrence over the N states with
that scalar decay, start from the initial state when one is given, and return the final state.
`dt_limit` (dt clamped after softplus) is the one part done here: only a limit other than
(0, inf) costs anything, dt is then finished in torch and handed to the kernel as is.

mamba_ssm computes the same scan chunk by chunk with matmuls (SSD); so can shammie
(`SHAMMIE_SSD_IMPL=chunked`, csrc/ssd/ssd_chunked.cpp, in chunks of its own size). `chunk_size` only
shapes that algorithm, so it is accepted and checked but does not change the result here.

Packed sequences (`seq_idx`) are a decay of zero at each step whose id differs from the previous
step's, inside the kernels: no state, and no gradient, crosses from one sequence into the next.
With `cu_seqlens` the kernels also copy out each sequence's final state (`return_varlen_states`), and
unlike mamba_ssm's those states have gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shammie._checks import cu_seqlens as check_cu_seqlens
from shammie._checks import same_device, same_dtype
from shammie._checks import seq_idx as check_seq_idx
from shammie._functorch import register_vmap_by_loop, transformable, under_transform, vmap_by_folding

_OP = "mamba_chunk_scan_combined"
_MAX_DSTATE = 256
_INTERVAL = 128   # csrc/ssd/ssd_scan.h kInterval: steps between the states the forward saves
_NO_LIMIT = (0.0, math.inf)


def _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_limit):
    """Shapes, devices and kinds of dtype, named in mamba_ssm's terms."""
    if x.dim() != 4:
        raise ValueError(f"{_OP}: x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
    batch, seqlen, heads, headdim = x.shape
    if B.dim() != 4:
        raise ValueError(f"{_OP}: B must be (batch, seqlen, ngroups, dstate), got {tuple(B.shape)}")
    groups, dstate = B.shape[2], B.shape[3]
    expected = {
        "dt": (dt, (batch, seqlen, heads)),
        "A": (A, (heads,)),
        "B": (B, (batch, seqlen, groups, dstate)),
        "C": (C, (batch, seqlen, groups, dstate)),
        "z": (z, (batch, seqlen, heads, headdim)),
        "dt_bias": (dt_bias, (heads,)),
        "initial_states": (initial_states, (batch, heads, headdim, dstate)),
    }
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{_OP}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) not in ((heads,), (heads, headdim)):
        raise ValueError(f"{_OP}: D must have shape ({heads},) or ({heads}, {headdim}), got {tuple(D.shape)}")
    same_device(_OP, "x", x, (*((name, t) for name, (t, _) in expected.items()), ("D", D)))
    if not 1 <= dstate <= _MAX_DSTATE:
        raise ValueError(f"{_OP}: B and C must have 1 <= dstate <= {_MAX_DSTATE} (their last dim), got {dstate}")
    if groups < 1 or heads % groups:
        raise ValueError(f"{_OP}: nheads ({heads}) must be a multiple of ngroups ({groups})")
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias),
                    ("initial_states", initial_states)):
        if t is not None and (t.is_complex() or not t.is_floating_point()):
            raise TypeError(f"{_OP}: {name} must be a real floating-point tensor, got {t.dtype}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{_OP}: chunk_size must be a positive int, got {chunk_size!r}")
    low, high = dt_limit
    if not low <= high:
        raise ValueError(f"{_OP}: dt_limit must be (low, high) with low <= high, got {dt_limit}")


def check_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_limit, seq_idx):
    """mamba_chunk_scan_combined's argument checks (all but cu_seqlens)."""
    _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_limit)
    check_seq_idx(_OP, seq_idx, "x", x, x.shape[0], x.shape[1])


def _finished_dt(dt, dt_bias, dt_softplus, dt_limit, dtype):
    """dt after bias, softplus (identity above 20, as the kernels) and the limit, in `dtype`."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = torch.where(dt > 20, dt, F.softplus(dt))
    return dt.clamp(*dt_limit)


def scan_operands(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit, seq_idx=None,
                  cu_seqlens=None):
    """The arguments of the ssd_scan op, in its order: the activations in the widest of their dtypes,
    and with a dt_limit, dt finished here (the kernel fuses bias and softplus but not the clamp), in the
    math dtype, scanning in that dtype so the finished dt is not rounded back to a 16-bit dtype."""
    dtype = x.dtype
    for t in (dt, B, C, z):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    if tuple(dt_limit) != _NO_LIMIT:
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        dt, dt_bias, dt_softplus = _finished_dt(dt, dt_bias, dt_softplus, dt_limit, dtype), None, False
    cast = lambda t: None if t is None else t.to(dtype)
    return (cast(x), cast(dt), A, cast(B), cast(C), D, cast(z), dt_bias, initial_states, dt_softplus, seq_idx,
            cu_seqlens)


def mamba_chunk_scan_combined(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                              chunk_size: int | None = None, D: torch.Tensor | None = None,
                              z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                              initial_states: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                              cu_seqlens: torch.Tensor | None = None, dt_softplus: bool = False,
                              dt_limit: tuple[float, float] = _NO_LIMIT, return_final_states: bool = False,
                              return_varlen_states: bool = False):
    """Mamba-2's scan, mamba_ssm's contract.

    x, z: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A, dt_bias: (nheads,), real;
    B, C: (batch, seqlen, ngroups, dstate) with nheads % ngroups == 0 and 1 ≤ dstate ≤ 256;
    D: (nheads,) or (nheads, headdim); initial_states: (batch, nheads, headdim, dstate).
    x, dt, B, C, z may be float32, float16, bfloat16 or float64 (computed in the widest of them; state
    and math in float32, float64 for float64). Returns out (batch, seqlen, nheads, headdim) in x's dtype,
    and with `return_final_states` also the final state (batch, nheads, headdim, dstate) in float32
    (float64). Differentiable in every tensor argument.

    Packed sequences: `seq_idx` (batch, seqlen), int32 or int64, non-decreasing along each row as in
    mamba_ssm; a step whose id differs from the previous step's starts from a zero state.
    `initial_states` then start the first sequence, and the final state is the last sequence's.

    `cu_seqlens` (num_seqs + 1,), int32 or int64, batch 1, as in mamba_ssm: sequence s is steps
    cu_seqlens[s] .. cu_seqlens[s+1] − 1, from 0 to seqlen. Without seq_idx the ids it implies are used;
    with seq_idx the two must agree (checked: one small host copy from a GPU). `return_varlen_states`
    (needs cu_seqlens) also returns each sequence's final state, (num_seqs, nheads, headdim, dstate) in
    float32 (zeros for an empty sequence; with initial_states the first sequence must not be empty),
    last in the returned tuple. Its gradient flows back into the scan (mamba_ssm's has none).
    """
    check_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_limit, seq_idx)
    check_cu_seqlens(_OP, cu_seqlens, "x", x, x.shape[0])
    if return_varlen_states and cu_seqlens is None:
        raise ValueError(f"{_OP}: return_varlen_states needs cu_seqlens (the packed sequences' boundaries)")
    scan = _Transformable.apply if under_transform() else torch.ops.shammie.ssd_scan   # torch.func transforms
    out, _, final_state, varlen_states = scan(
        *scan_operands(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit, seq_idx, cu_seqlens))
    returned = (out.to(x.dtype),) + ((final_state,) if return_final_states else ())
    returned += (varlen_states,) if return_varlen_states else ()
    return returned if len(returned) > 1 else returned[0]


# ---- registration: fake kernels and autograd for torch.ops.shammie.ssd_scan ------------------------

def _accumulation_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_op(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens):
    """The checks of csrc/ssd/ssd_scan.cpp, for fake tensors: the layout checks plus one activation dtype
    (cu_seqlens' values need the data: the kernels' front end checks them)."""
    _check(x, dt, A, B, C, None, D, z, dt_bias, initial_states, _NO_LIMIT)
    same_dtype("ssd_scan", "x", x, (("dt", dt), ("z", z)))
    check_seq_idx("ssd_scan", seq_idx, "x", x, x.shape[0], x.shape[1])
    check_cu_seqlens("ssd_scan", cu_seqlens, "x", x, x.shape[0])
    batch, seqlen, heads, headdim = x.shape
    return batch, seqlen, heads, headdim, B.shape[3]


def _num_checkpoints(seqlen):
    return max(1, -(-seqlen // _INTERVAL))


@torch.library.register_fake("shammie::ssd_scan")
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, seq_idx=None, cu_seqlens=None):
    batch, seqlen, heads, headdim, dstate = _check_op(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx,
                                                      cu_seqlens)
    acc = _accumulation_dtype(x)
    checkpoints = x.new_empty((batch, heads, _num_checkpoints(seqlen), headdim, dstate), dtype=acc)
    final_state = x.new_empty((batch, heads, headdim, dstate), dtype=acc)
    num_seqs = 0 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    varlen_states = x.new_empty((num_seqs, heads, headdim, dstate), dtype=acc)
    return torch.empty_like(x, memory_format=torch.contiguous_format), checkpoints, final_state, varlen_states


@torch.library.register_fake("shammie::ssd_scan_backward")
def _(grad_out, grad_final, x, dt, A, B, C, D, z, dt_bias, initial_states, checkpoints, dt_softplus, seq_idx=None,
      cu_seqlens=None, grad_varlen=None):
    _, _, heads, headdim, _ = _check_op(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens)
    acc = _accumulation_dtype(x)
    like = lambda t, dtype=None: torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)
    nothing = x.new_empty((0,))
    return [like(x), like(dt), like(A), like(B), like(C),
            like(D) if D is not None else x.new_empty((heads * headdim,), dtype=acc),
            like(z) if z is not None else nothing, x.new_empty((heads,), dtype=acc),
            like(initial_states) if initial_states is not None else nothing]


# Autograd is registered in C++: csrc/ssd/ssd_scan_autograd.cpp (csrc/common/autograd.h says why).
# Under torch.func transforms the scan runs through the Function below instead (shammie/_functorch.py).

def _ssd_backward(grads, inputs, outputs):
    x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, seq_idx, cu_seqlens = inputs
    grad_out, _, grad_final, grad_varlen = grads   # none for the checkpoints, the backward's starting states
    d = torch.ops.shammie.ssd_scan_backward(grad_out, grad_final, x, dt, A, B, C, D, z, dt_bias, initial_states,
                                            outputs[1], dt_softplus, seq_idx, cu_seqlens,
                                            None if cu_seqlens is None else grad_varlen)
    # d(dt_bias) comes in the accumulation dtype; dD, dz, d(dt_bias), d(initial_states) only where given.
    optional = [(D, d[5]), (z, d[6]), (dt_bias, None if dt_bias is None else d[7].to(dt_bias.dtype)),
                (initial_states, d[8])]
    return (*d[:5], *(grad for given, grad in optional if given is not None))


_Transformable = transformable("ssd_scan", torch.ops.shammie.ssd_scan, _ssd_backward)


@torch.library.register_vmap("shammie::ssd_scan")
def _(info, in_dims, x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, seq_idx=None, cu_seqlens=None):
    args = (x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, seq_idx, cu_seqlens)[:len(in_dims)]
    # x, dt, B, C, z, initial_states and seq_idx have the batch first; packed sequences (cu_seqlens) have
    # a batch of one, so they loop
    activations = {0, 1, 3, 4, 6, 8, 10} if cu_seqlens is None else set()
    return vmap_by_folding(torch.ops.shammie.ssd_scan, info, in_dims, args, activations)


register_vmap_by_loop("ssd_scan_backward")


__all__ = ["mamba_chunk_scan_combined"]
