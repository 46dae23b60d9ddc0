"""`mamba_inner_fn`: a Mamba-1 mixer's whole training path, mamba_ssm's contract, built from shammie's
differentiable ops: causal conv1d + SiLU → x_proj → dt_proj → selective scan with z gating → out_proj.

`checkpoint_lvl` ≥ 1 (mamba_ssm's default) keeps, as mamba_ssm does, xz and the weights rather than
the conv output and delta (two (batch, dim, L) activations of every layer): an autograd Function runs
the scan kernel forward and, in the backward, recomputes the conv and the projections, calls the
scan's backward kernel and sends its gradients back through the recomputed graph. Level 0, any call
under torch.compile (whose partitioner makes its own recompute choices) and any under a torch.func
transform (which cannot transform that Function; the ops can) composes the ops, each with its own
backward. Both give the same gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shammie._autograd import once_differentiable
from shammie._functorch import under_transform
from shammie.causal_conv1d import causal_conv1d_fn
from shammie.selective_scan import selective_scan_fn

_OP = "mamba_inner_fn"


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def _scan_inputs(eps, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, B, C, B_proj_bias,
                 C_proj_bias, b_rms_weight, c_rms_weight, dt_rms_weight):
    """conv + SiLU → x_proj → dt_proj (and the optional norms): the scan's u, delta, B, C and z."""
    dtype = xz.dtype
    dt_rank = delta_proj_weight.shape[1]
    dstate = (x_proj_weight.shape[0] - dt_rank) // 2
    x, z = xz.chunk(2, dim=1)
    weight = conv1d_weight.squeeze(1) if conv1d_weight.dim() == 3 else conv1d_weight
    x = causal_conv1d_fn(x, weight.to(dtype), None if conv1d_bias is None else conv1d_bias.to(dtype),
                         activation="silu")
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight.to(dtype))            # (batch, L, dt_rank + 2N)
    dt, B_in, C_in = x_dbl.split([dt_rank, dstate, dstate], dim=-1)
    delta = F.linear(dt, delta_proj_weight.to(dtype))                       # (batch, L, dim)
    if dt_rms_weight is not None:   # as mamba_ssm: over the dim channels of delta, after dt_proj
        delta = _rms_norm(delta, dt_rms_weight, eps)
    delta = delta.transpose(1, 2)                                            # (batch, dim, L)

    def input_dependent(given, projected, bias, rms_weight):
        if given is not None:
            return given
        if bias is not None:
            projected = projected + bias.to(dtype)
        if rms_weight is not None:
            projected = _rms_norm(projected, rms_weight, eps)
        return projected.transpose(1, 2)                                     # (batch, N, L)

    return x, delta, input_dependent(B, B_in, B_proj_bias, b_rms_weight), \
        input_dependent(C, C_in, C_proj_bias, c_rms_weight), z


class _RecomputedScan(torch.autograd.Function):
    """The gated scan output from xz and the weights, saving only those (and the scan's state
    checkpoints); the backward recomputes the scan's inputs (see the module docstring)."""

    @staticmethod
    def forward(ctx, eps, softplus, A, D, delta_bias, *tensors):
        with torch.no_grad():
            u, delta, B, C, z = _scan_inputs(eps, *tensors)
            out, checkpoints = torch.ops.shammie.selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus)
        ctx.save_for_backward(A, D, delta_bias, checkpoints, *tensors)
        ctx.eps, ctx.softplus = eps, softplus
        return out

    @staticmethod
    @once_differentiable("mamba_inner_fn")
    def backward(ctx, grad_out):
        A, D, delta_bias, checkpoints, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[5:]
        leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(tensors, needs)]
        with torch.enable_grad():
            scan_inputs = _scan_inputs(ctx.eps, *leaves)
        u, delta, B, C, z = (t.detach() for t in scan_inputs)
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = torch.ops.shammie.selective_scan_backward(
            grad_out.contiguous(), None, u, delta, A, B, C, D, z, delta_bias, checkpoints, ctx.softplus)
        # Through the recomputed conv and projections to xz and the weights.
        outputs = [(t, g) for t, g in zip(scan_inputs, (du, ddelta, dB, dC, dz)) if t.requires_grad]
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad([t for t, _ in outputs], wanted, [g for _, g in outputs],
                                         allow_unused=True) if outputs and wanted else ())
        tensor_grads = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
        return (None, None, dA if ctx.needs_input_grad[2] else None,
                dD.to(D.dtype) if ctx.needs_input_grad[3] else None,
                ddelta_bias.to(delta_bias.dtype) if ctx.needs_input_grad[4] else None, *tensor_grads)


def mamba_inner_fn(xz: torch.Tensor, conv1d_weight: torch.Tensor, conv1d_bias: torch.Tensor | None,
                   x_proj_weight: torch.Tensor, delta_proj_weight: torch.Tensor, out_proj_weight: torch.Tensor,
                   out_proj_bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor | None = None,
                   C: torch.Tensor | None = None, D: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, B_proj_bias: torch.Tensor | None = None,
                   C_proj_bias: torch.Tensor | None = None, delta_softplus: bool = True, checkpoint_lvl: int = 1,
                   b_rms_weight: torch.Tensor | None = None, c_rms_weight: torch.Tensor | None = None,
                   dt_rms_weight: torch.Tensor | None = None, b_c_dt_rms_eps: float = 1e-6, **unused) -> torch.Tensor:
    """xz: (batch, 2·dim, L), the in-projection's output, x then z. conv1d_weight: (dim, width) or the
    Conv1d module's (dim, 1, width). x_proj_weight: (dt_rank + 2N, dim); delta_proj_weight:
    (dim, dt_rank); A: (dim, N). B / C: None to take them from x_proj (input-dependent), or as
    selective_scan_fn accepts. Optional RMS norms (mamba_ssm's, used for Falcon-Mamba): of B and C over
    their dstate (weights (dstate,)), and of delta after dt_proj over its dim (weight (dim,)). Returns
    (batch, L, out_features). `checkpoint_lvl` 0 or 1 (the default): with 1 the backward recomputes the
    conv output and delta instead of keeping them (module docstring); the scan's states are always
    recomputed from its checkpoints."""
    if xz.dim() != 3 or xz.shape[1] % 2:
        raise ValueError(f"{_OP}: xz must be (batch, 2·dim, seqlen), got {tuple(xz.shape)}")
    if A.dim() != 2:
        raise ValueError(f"{_OP}: A must be (dim, dstate), got {tuple(A.shape)}")
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"{_OP}: checkpoint_lvl must be 0 or 1, got {checkpoint_lvl!r}")
    dtype = xz.dtype
    dt_rank, dstate = delta_proj_weight.shape[1], A.shape[1]
    if x_proj_weight.shape[0] != dt_rank + 2 * dstate:
        raise ValueError(f"{_OP}: x_proj_weight must have dt_rank + 2·dstate = {dt_rank + 2 * dstate} rows, "
                         f"got {tuple(x_proj_weight.shape)}")
    tensors = (xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, B, C, B_proj_bias, C_proj_bias,
               b_rms_weight, c_rms_weight, dt_rms_weight)
    differentiable = [t for t in (*tensors, A, D, delta_bias) if t is not None and t.requires_grad]
    recompute = differentiable and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if checkpoint_lvl == 1 and recompute and not under_transform():   # torch.func: the ops' own Functions
        y = _RecomputedScan.apply(b_c_dt_rms_eps, delta_softplus, A, D, delta_bias, *tensors)
    else:
        u, delta, B_scan, C_scan, z = _scan_inputs(b_c_dt_rms_eps, *tensors)
        y = selective_scan_fn(u, delta, A, B_scan, C_scan, D, z, delta_bias, delta_softplus)
    bias = None if out_proj_bias is None else out_proj_bias.to(dtype)
    return F.linear(y.transpose(1, 2), out_proj_weight.to(dtype), bias)
