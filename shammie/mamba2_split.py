"""`mamba_split_conv1d_scan_combined`: a Mamba-2 mixer after its in-projection, mamba_ssm's contract
(its training path): split zxbcdt into z, xBC and dt; causal conv1d over xBC; the SSD scan; the gated
RMSNorm and the out-projection. As in mamba_ssm, zxbcdt may start with 2·d_nonssm channels of a gated
MLP beside the mixer (z0, x0): silu(z0)·x0 goes ahead of the mixer's output, into the out-projection.

Training in eager mode runs as one autograd Function that keeps what mamba_ssm's fused function
keeps: zxbcdt, the weights, the scan's output and its state checkpoints. Its backward recomputes the
conv, the norm and the projection around the scan, calls the scan's backward kernel, and sends the
gradients back through the recomputed graph. Without gradients, under torch.compile (whose
partitioner makes its own recompute choices) and under torch.func transforms (which cannot transform
that Function; the ops can), the same pieces are composed, each with its own backward. Both give the
same gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shammie._autograd import once_differentiable
from shammie._functorch import under_transform
from shammie.causal_conv1d import causal_conv1d_fn
from shammie.mamba2 import check_scan, mamba_chunk_scan_combined, scan_operands

_OP = "mamba_split_conv1d_scan_combined"
_NO_LIMIT = (0.0, math.inf)


def _gated_rms_norm(x, z, weight, eps, group_size, norm_before_gate):
    """mamba_ssm's gated RMSNorm over groups of `group_size` channels, in float32 (float64 for float64):
    RMSNorm(x)·silu(z) if norm_before_gate, else RMSNorm(x·silu(z)); out in x's dtype."""
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(math_dtype)
    gate = F.silu(z.to(math_dtype))
    if not norm_before_gate:
        y = y * gate
    grouped = y.unflatten(-1, (-1, group_size))
    y = (grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight.to(math_dtype)
    if norm_before_gate:
        y = y * gate
    return y.to(x.dtype)


@dataclass(frozen=True)
class _Mixer:
    """The mixer's sizes and settings: how to split zxbcdt, and what runs around the scan."""
    heads: int
    headdim: int
    ngroups: int
    dstate: int
    activation: str | None
    dt_limit: tuple
    rmsnorm_eps: float
    norm_before_gate: bool
    gated_norm: bool   # z gates through the RMSNorm (else inside the scan)
    chunk_size: int | None
    nonssm: int        # mamba_ssm's d_nonssm: zxbcdt's leading (z0, x0) channels of the gated MLP

    @property
    def dim(self):
        return self.heads * self.headdim

    def conv_and_split(self, zxbcdt, weight, conv1d_bias, seq_idx):
        """z (batch, L, H, P), and after the conv x (batch, L, H, P), B and C (batch, L, G, N), dt."""
        dim, bc = self.dim, self.ngroups * self.dstate
        _, z, xBC, dt = zxbcdt.split([2 * self.nonssm, dim, dim + 2 * bc, self.heads], dim=-1)
        xBC = causal_conv1d_fn(xBC.transpose(1, 2), weight.to(zxbcdt.dtype),
                               None if conv1d_bias is None else conv1d_bias.to(zxbcdt.dtype), seq_idx=seq_idx,
                               activation=self.activation).transpose(1, 2)
        x, B, C = xBC.split([dim, bc, bc], dim=-1)
        heads = (self.heads, self.headdim)
        groups = (self.ngroups, self.dstate)
        return z.unflatten(-1, heads), x.unflatten(-1, heads), B.unflatten(-1, groups), C.unflatten(-1, groups), dt

    def norm(self, y, z, rmsnorm_weight):
        """The scan's output (batch, L, H, P) flattened, through the gated norm when there is one."""
        out = y.flatten(-2)
        if self.gated_norm:
            out = _gated_rms_norm(out, z.flatten(-2), rmsnorm_weight, self.rmsnorm_eps, self.dim // self.ngroups,
                                  self.norm_before_gate)
        return out

    def gate_nonssm(self, zxbcdt, dtype):
        """silu(z0)·x0 over zxbcdt's first 2·d_nonssm channels, in float32 (float64 for float64), out in
        `dtype` (the normed output's); None without them."""
        if not self.nonssm:
            return None
        math_dtype = torch.float64 if zxbcdt.dtype == torch.float64 else torch.float32
        z0, x0 = zxbcdt[..., :2 * self.nonssm].to(math_dtype).chunk(2, dim=-1)
        return (F.silu(z0) * x0).to(dtype)

    @staticmethod
    def join(gated, normed):
        """What the out-projection takes: the gated MLP's channels, then the mixer's."""
        return normed if gated is None else torch.cat([gated, normed], dim=-1)

    @staticmethod
    def project(normed, outproj_weight, outproj_bias):
        if outproj_weight is None:
            return normed
        bias = None if outproj_bias is None else outproj_bias.to(normed.dtype)
        return F.linear(normed, outproj_weight.to(normed.dtype), bias)


class _RecomputedMixer(torch.autograd.Function):
    """Training path that keeps zxbcdt, the weights, the scan's output and checkpoints (module docstring)."""

    @staticmethod
    def forward(ctx, mixer, zxbcdt, weight, conv1d_bias, dt_bias, A, D, initial_states, seq_idx, rmsnorm_weight,
                outproj_weight, outproj_bias):
        with torch.no_grad():
            z, x, B, C, dt = mixer.conv_and_split(zxbcdt, weight, conv1d_bias, seq_idx)
            scan_z = None if mixer.gated_norm else z
            check_scan(x, dt, A, B, C, mixer.chunk_size, D, scan_z, dt_bias, initial_states, mixer.dt_limit, seq_idx)
            operands = scan_operands(x, dt, A, B, C, D, scan_z, dt_bias, initial_states, True, mixer.dt_limit, seq_idx)
            y, checkpoints, final_state, _ = torch.ops.shammie.ssd_scan(*operands)
            y = y.to(zxbcdt.dtype)   # kept in the activations' dtype (the scan may run wider, for dt_limit)
            normed = mixer.norm(y, z, rmsnorm_weight)
            out = mixer.project(mixer.join(mixer.gate_nonssm(zxbcdt, normed.dtype), normed), outproj_weight,
                                outproj_bias)
            if out._is_view():   # autograd forbids in-place use of a Function's view outputs; callers may add_
                out = out.clone()
        ctx.mixer = mixer
        ctx.save_for_backward(zxbcdt, weight, conv1d_bias, dt_bias, A, D, initial_states, seq_idx, rmsnorm_weight,
                              outproj_weight, outproj_bias, y, checkpoints)
        return out, final_state

    @staticmethod
    @once_differentiable("mamba_split_conv1d_scan_combined")
    def backward(ctx, grad_out, grad_final):
        mixer = ctx.mixer
        *tensors, y, checkpoints = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(tensors, needs)]
        zxbcdt, weight, conv1d_bias, dt_bias, A, D, initial_states, seq_idx, rmsnorm_weight, outproj_weight, \
            outproj_bias = leaves
        y_leaf = y.detach().requires_grad_(True)
        with torch.enable_grad():
            z, x, B, C, dt = mixer.conv_and_split(zxbcdt, weight, conv1d_bias, seq_idx)
            operands = scan_operands(x, dt, A, B, C, D, None if mixer.gated_norm else z, dt_bias, initial_states,
                                     True, mixer.dt_limit, seq_idx)
            normed = mixer.norm(y_leaf, z, rmsnorm_weight)
            gated = mixer.gate_nonssm(zxbcdt, normed.dtype)
        joined = mixer.join(None if gated is None else gated.detach(), normed.detach())
        # The out-projection by hand, so its GEMM is not run again: d joined = grad_out·W, dW = grad_outᵀ·joined,
        # in grad_out's dtype (under autocast the forward's GEMM ran in a lower one than joined's).
        grad_joined, projection_grads = grad_out, {}   # leaf index -> gradient
        if outproj_weight is not None:
            flat_grad = grad_out.flatten(0, -2)
            flat_joined = joined.flatten(0, -2).to(flat_grad.dtype)
            grad_joined = (flat_grad @ outproj_weight.to(flat_grad.dtype)).view(joined.shape).to(joined.dtype)
            if outproj_weight.requires_grad:
                projection_grads[9] = (flat_grad.t() @ flat_joined).to(outproj_weight.dtype)
            if outproj_bias is not None and outproj_bias.requires_grad:
                projection_grads[10] = flat_grad.sum(0).to(outproj_bias.dtype)
        grad_gated, grad_normed = grad_joined.split([mixer.nonssm, mixer.dim], dim=-1)
        # Through the norm once: to y (for the scan), z and the norm's weight.
        through_norm = [y_leaf] + ([z] if mixer.gated_norm and z.requires_grad else [])
        norm_weight = 8 if mixer.gated_norm and rmsnorm_weight.requires_grad else None
        if norm_weight is not None:
            through_norm.append(rmsnorm_weight)
        norm_grads = list(torch.autograd.grad(normed, through_norm, grad_normed))
        if norm_weight is not None:
            projection_grads[norm_weight] = norm_grads.pop()
        dy = norm_grads[0].to(operands[0].dtype)
        scan_tensors = operands[:9]   # x, dt, A, B, C, D, z, dt_bias, initial_states
        detached = [None if t is None else t.detach() for t in scan_tensors]
        scan_grads = torch.ops.shammie.ssd_scan_backward(dy, grad_final, *detached, checkpoints, operands[9],
                                                         operands[10])
        # One pass back from z (the norm's gate) and the scan's inputs to zxbcdt and the other weights.
        pairs = [(z, norm_grads[1])] if len(norm_grads) > 1 else []
        if gated is not None and gated.requires_grad:
            pairs.append((gated, grad_gated))
        pairs += [(t, g.to(t.dtype)) for t, g in zip(scan_tensors, scan_grads) if t is not None and t.requires_grad]
        wanted = [i for i, t in enumerate(leaves) if t is not None and t.requires_grad and i not in projection_grads]
        grads = dict(zip(wanted, torch.autograd.grad([t for t, _ in pairs], [leaves[i] for i in wanted],
                                                     [g for _, g in pairs], allow_unused=True) if wanted else ()))
        grads.update(projection_grads)
        return (None, *(grads.get(i) for i in range(len(leaves))))


def mamba_split_conv1d_scan_combined(zxbcdt: torch.Tensor, conv1d_weight: torch.Tensor,
                                     conv1d_bias: torch.Tensor | None, dt_bias: torch.Tensor, A: torch.Tensor,
                                     D: torch.Tensor, chunk_size: int | None = None,
                                     initial_states: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                                     dt_limit: tuple[float, float] = _NO_LIMIT, return_final_states: bool = False,
                                     activation: str | None = "silu", rmsnorm_weight: torch.Tensor | None = None,
                                     rmsnorm_eps: float = 1e-6, outproj_weight: torch.Tensor | None = None,
                                     outproj_bias: torch.Tensor | None = None, headdim: int | None = None,
                                     ngroups: int = 1, norm_before_gate: bool = True):
    """A Mamba-2 mixer after its in-projection, mamba_ssm's contract (its training path): split
    zxbcdt (batch, seqlen, 2·d_nonssm + 2·dim + 2·ngroups·dstate + nheads) into z0, x0, z, xBC and dt;
    causal conv1d with `activation` over xBC (weight (dim + 2·ngroups·dstate, width) or the Conv1d
    module's (·, 1, width), which gives dstate); the SSD scan with dt_bias, softplus, D and dt_limit
    (z gating inside the scan when there is no `rmsnorm_weight`); then the gated RMSNorm over groups of
    dim / ngroups channels; silu(z0)·x0 (d_nonssm channels, none when d_nonssm = 0) goes ahead of it;
    then the out-projection (outproj_weight (out_dim, d_nonssm + dim)) when its weights are given. D is
    (nheads,) with `headdim`, or (nheads, headdim). Returns out (batch, seqlen, out_dim or
    d_nonssm + dim), and with `return_final_states` the final SSM state.
    Exact gradients; in eager training it keeps what mamba_ssm's fused function keeps (module docstring).
    """
    if zxbcdt.dim() != 3:
        raise ValueError(f"{_OP}: zxbcdt must be (batch, seqlen, channels), got {tuple(zxbcdt.shape)}")
    if D.dim() == 1:
        if headdim is None:
            raise ValueError(f"{_OP}: pass headdim when D is per head ({tuple(D.shape)})")
        heads = D.shape[0]
    elif D.dim() == 2:
        heads, headdim = D.shape
    else:
        raise ValueError(f"{_OP}: D must be (nheads,) or (nheads, headdim), got {tuple(D.shape)}")
    channels = zxbcdt.shape[2]
    dim = heads * headdim
    if ngroups < 1 or heads % ngroups:
        raise ValueError(f"{_OP}: nheads ({heads}) must be a multiple of ngroups ({ngroups})")
    # As in mamba_ssm, the conv weight gives dstate, and what zxbcdt has beyond the mixer's channels
    # is the gated MLP's (z0, x0).
    weight = conv1d_weight.squeeze(1) if conv1d_weight.dim() == 3 else conv1d_weight
    bc_channels = weight.shape[0] - dim if weight.dim() == 2 else 0
    if weight.dim() != 2 or bc_channels <= 0 or bc_channels % (2 * ngroups):
        raise ValueError(f"{_OP}: conv1d_weight must be (dim + 2·ngroups·dstate, width) or (·, 1, width) with "
                         f"dim = {dim}, ngroups = {ngroups} and dstate >= 1, got {tuple(conv1d_weight.shape)}")
    dstate = bc_channels // (2 * ngroups)
    nonssm_channels = channels - (2 * dim + bc_channels + heads)
    if nonssm_channels < 0 or nonssm_channels % 2:
        raise ValueError(f"{_OP}: zxbcdt's last dim ({channels}) must be 2·d_nonssm + 2·dim + 2·ngroups·dstate + "
                         f"nheads = 2·d_nonssm + {2 * dim + bc_channels + heads} (dim = {dim}, "
                         f"2·ngroups·dstate = {bc_channels} from conv1d_weight, nheads = {heads}), d_nonssm >= 0")
    nonssm = nonssm_channels // 2
    if rmsnorm_weight is not None and tuple(rmsnorm_weight.shape) != (dim,):
        raise ValueError(f"{_OP}: rmsnorm_weight must have shape ({dim},), got {tuple(rmsnorm_weight.shape)}")
    if outproj_weight is not None and (outproj_weight.dim() != 2 or outproj_weight.shape[1] != nonssm + dim):
        raise ValueError(f"{_OP}: outproj_weight must be (out_dim, d_nonssm + dim) = (out_dim, {nonssm + dim}) "
                         f"(d_nonssm = {nonssm} from zxbcdt's width), got {tuple(outproj_weight.shape)}")
    mixer = _Mixer(heads, headdim, ngroups, dstate, activation, tuple(dt_limit), rmsnorm_eps, norm_before_gate,
                   rmsnorm_weight is not None, chunk_size, nonssm)
    tensors = (zxbcdt, weight, conv1d_bias, dt_bias, A, D, initial_states, seq_idx, rmsnorm_weight, outproj_weight,
               outproj_bias)
    trains = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if trains and not torch.compiler.is_compiling() and not under_transform():   # torch.func: composed ops
        out, final_state = _RecomputedMixer.apply(mixer, *tensors)
    else:
        z, x, B, C, dt = mixer.conv_and_split(zxbcdt, weight, conv1d_bias, seq_idx)
        y, final_state = mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, z=None if mixer.gated_norm else z, dt_bias=dt_bias,
            initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
            return_final_states=True)
        normed = mixer.norm(y, z, rmsnorm_weight)
        out = mixer.project(mixer.join(mixer.gate_nonssm(zxbcdt, normed.dtype), normed), outproj_weight,
                            outproj_bias)
    return (out, final_state) if return_final_states else out


__all__ = ["mamba_split_conv1d_scan_combined"]
