"""Backward functions of shammie's Python autograd.Functions (the fused Mamba training paths) that are
differentiable once, with a clear error on a second derivative.

Shammie's backward ops have no derivatives of their own. Without a guard, create_graph=True through
them gives gradients that a double backward silently treats as constants (zeros). torch's
@once_differentiable raises only when backward() reaches it, and links its error to fresh leaves,
so `torch.autograd.grad(g, params)` reports "not used in the graph" instead; this version links the
error node to the tensors the gradients came from. The ops' own autograd does the same in C++
(csrc/common/autograd.h).
"""

from __future__ import annotations

import functools

import torch


class _RaiseOnBackward(torch.autograd.Function):
    """Identity on the gradients; its inputs also include what they were computed from, so that
    any derivative of the gradients with respect to those reaches this backward, which raises."""

    @staticmethod
    def forward(ctx, op, count, *tensors):
        ctx.op = op
        return tuple(t.view_as(t) if t is not None else None for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.op}: differentiating its gradients again (double backward, or create_graph=True "
                           "followed by a backward through them) is not supported")


def once_differentiable(op: str):
    """Decorator for a backward(ctx, *grads) whose result must not be differentiated again."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            sources = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not sources:
                return outputs
            single = not isinstance(outputs, tuple)
            outputs = (outputs,) if single else outputs
            linked = _RaiseOnBackward.apply(op, len(outputs), *outputs, *sources)
            return linked[0] if single else linked

        return wrapper

    return decorate
