"""`mamba_inner_fn`: a Mamba-1 mixer's whole training path, mamba_ssm's contract, built from shammie's
differentiable ops: causal conv1d + SiLU → x_proj → dt_proj → selective scan with z gating → out_proj.

mamba_ssm fuses these into one autograd Function to save activations; here each piece keeps its own
backward (the conv and the scan are shammie kernels, the projections are torch's GEMMs), so the
gradients are exact and the graph stays visible to torch.compile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shammie.causal_conv1d import causal_conv1d_fn
from shammie.selective_scan import selective_scan_fn


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


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
    (batch, L, out_features). `checkpoint_lvl` is accepted for compatibility; the scan always
    recomputes its states in the backward."""
    if xz.dim() != 3 or xz.shape[1] % 2:
        raise ValueError(f"mamba_inner_fn: xz must be (batch, 2·dim, seqlen), got {tuple(xz.shape)}")
    if A.dim() != 2:
        raise ValueError(f"mamba_inner_fn: A must be (dim, dstate), got {tuple(A.shape)}")
    dtype = xz.dtype
    batch, _, seqlen = xz.shape
    dt_rank, dstate = delta_proj_weight.shape[1], A.shape[1]
    if x_proj_weight.shape[0] != dt_rank + 2 * dstate:
        raise ValueError(f"mamba_inner_fn: x_proj_weight must have dt_rank + 2·dstate = {dt_rank + 2 * dstate} rows, "
                         f"got {tuple(x_proj_weight.shape)}")
    x, z = xz.chunk(2, dim=1)
    weight = conv1d_weight.squeeze(1) if conv1d_weight.dim() == 3 else conv1d_weight
    x = causal_conv1d_fn(x, weight.to(dtype), None if conv1d_bias is None else conv1d_bias.to(dtype),
                         activation="silu")
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight.to(dtype))            # (batch, L, dt_rank + 2N)
    dt, B_in, C_in = x_dbl.split([dt_rank, dstate, dstate], dim=-1)
    delta = F.linear(dt, delta_proj_weight.to(dtype))                       # (batch, L, dim)
    if dt_rms_weight is not None:   # as mamba_ssm: over the dim channels of delta, after dt_proj
        delta = _rms_norm(delta, dt_rms_weight, b_c_dt_rms_eps)
    delta = delta.transpose(1, 2)                                            # (batch, dim, L)

    def input_dependent(given, projected, bias, rms_weight):
        if given is not None:
            return given
        if bias is not None:
            projected = projected + bias.to(dtype)
        if rms_weight is not None:
            projected = _rms_norm(projected, rms_weight, b_c_dt_rms_eps)
        return projected.transpose(1, 2)                                     # (batch, N, L)

    B = input_dependent(B, B_in, B_proj_bias, b_rms_weight)
    C = input_dependent(C, C_in, C_proj_bias, c_rms_weight)
    y = selective_scan_fn(x, delta, A, B, C, D, z, delta_bias, delta_softplus)
    bias = None if out_proj_bias is None else out_proj_bias.to(dtype)
    return F.linear(y.transpose(1, 2), out_proj_weight.to(dtype), bias)
