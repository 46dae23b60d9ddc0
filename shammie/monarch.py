"""Monarch (block-diagonal butterfly) product: the public function and its fakes (autograd: in C++;
under torch.func transforms, shammie/_functorch.py).

For x of shape (..., k·p), w1_bfly (k, q, p) and w2_bfly (l, s, r) with l·r = k·q:
u = blockdiag(w1) x, z_c[a] = u[a·l + c], v_c = w2[c] z_c, y[m·l + c] = v_c[m]; y is (..., l·s).
Same contract as `blockdiag_butterfly_multiply` in HazyResearch's fly and the MoRe repository.
Kernels: csrc/monarch/.
"""

from __future__ import annotations

import torch

from shammie._checks import same_dtype_and_device
from shammie._functorch import register_vmap_by_loop, transformable, under_transform, vmap_by_loop

_OP = "blockdiag_butterfly_multiply"
_FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def blockdiag_butterfly_multiply(x: torch.Tensor, w1_bfly: torch.Tensor, w2_bfly: torch.Tensor) -> torch.Tensor:
    """Monarch product of x (..., n) with w1_bfly (k, q, p) and w2_bfly (l, s, r); returns (..., l·s).

    n = k·p and l·r = k·q. The three tensors share one dtype (float32, float16, bfloat16 or
    float64; math in float32, or float64 for float64) and one device. Differentiable in all three.
    """
    if under_transform():   # torch.func.grad, vmap(grad) (per-sample gradients), jacrev, ...
        return _Transformable.apply(x, w1_bfly, w2_bfly)
    return torch.ops.shammie.blockdiag_butterfly_multiply(x, w1_bfly, w2_bfly)


def _check_args(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> None:
    """The checks of csrc/monarch/monarch.cpp, for fake tensors (torch.compile, meta)."""
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must have at least 1 dimension(s) (..., n), got a tensor of shape {tuple(x.shape)}")
    if w1.dim() != 3:
        raise ValueError(f"{_OP}: w1_bfly must be 3-D (k, q, p), got a tensor of shape {tuple(w1.shape)}")
    if w2.dim() != 3:
        raise ValueError(f"{_OP}: w2_bfly must be 3-D (l, s, r), got a tensor of shape {tuple(w2.shape)}")
    if x.dtype not in _FLOATING:
        raise TypeError(f"{_OP}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    same_dtype_and_device(_OP, "x", x, (("w1_bfly", w1), ("w2_bfly", w2)))
    for name, w in (("w1_bfly", w1), ("w2_bfly", w2)):
        if w.numel() == 0:
            raise ValueError(f"{_OP}: {name} must have non-zero sizes, got {list(w.shape)}")
    k, q, p = w1.shape
    l, s, r = w2.shape
    if k * p != x.shape[-1]:
        raise ValueError(f"{_OP}: x's last dimension must equal k·p = {k * p} for w1_bfly of shape {tuple(w1.shape)}, got {x.shape[-1]}")
    if l * r != k * q:
        raise ValueError(f"{_OP}: w2_bfly of shape {tuple(w2.shape)} needs l·r = k·q = {k * q}, got l·r = {l * r}")


@torch.library.register_fake("shammie::blockdiag_butterfly_multiply")
def _(x, w1_bfly, w2_bfly):
    _check_args(x, w1_bfly, w2_bfly)
    l, s, _r = w2_bfly.shape
    return x.new_empty((*x.shape[:-1], l * s))


@torch.library.register_fake("shammie::blockdiag_butterfly_multiply_backward")
def _(grad_out, x, w1_bfly, w2_bfly):
    _check_args(x, w1_bfly, w2_bfly)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(w1_bfly), torch.empty_like(w2_bfly)

# Autograd is registered in C++: csrc/monarch/monarch_autograd.cpp (csrc/common/autograd.h says why).

_Transformable = transformable(
    _OP, torch.ops.shammie.blockdiag_butterfly_multiply,
    lambda grads, inputs, outputs: torch.ops.shammie.blockdiag_butterfly_multiply_backward(grads[0], *inputs))


@torch.library.register_vmap("shammie::blockdiag_butterfly_multiply")
def _(info, in_dims, x, w1_bfly, w2_bfly):
    if in_dims[1] is None and in_dims[2] is None:   # shared factors: the batch is more leading dims of x
        return torch.ops.shammie.blockdiag_butterfly_multiply(x.movedim(in_dims[0], 0), w1_bfly, w2_bfly), 0
    return vmap_by_loop(torch.ops.shammie.blockdiag_butterfly_multiply, info, in_dims, x, w1_bfly, w2_bfly)


register_vmap_by_loop("blockdiag_butterfly_multiply_backward")
