"""torch.func transforms (grad, vjp, jacrev, and vmap over them: per-sample gradients) through shammie's
ops.

An op's autograd is a C++ torch::autograd::Function (csrc/<family>/<family>_autograd.cpp), which
functorch refuses to transform. Under a torch.func transform a public function routes through a
Python autograd.Function instead, with the same forward and backward ops, setup_context and
generate_vmap_rule, which functorch can transform. Outside the transforms nothing changes: one C
call looks at functorch's (empty) interpreter stack. The gradients are first order here too:
a second derivative (grad of grad) and forward mode (jvp) raise an error naming the op.
"""

from __future__ import annotations

from typing import Callable

import torch


def under_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, ...) is running. Never while Dynamo traces
    (torch.compile), which sees a non-empty stack there and cannot trace the Function's jvp: the op
    itself goes into the graph, as without transforms."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def _no_second_derivative(op: str):
    return RuntimeError(f"{op}: differentiating its gradients again (double backward, or grad of grad) "
                        "is not supported")


def _no_forward_mode(op: str):
    return RuntimeError(f"{op}: forward-mode AD (jvp is not implemented); use reverse mode (torch.func.grad, "
                        "vjp, jacrev)")


class _FirstOrderBackward(torch.autograd.Function):
    """The op's backward, as a function whose own derivative raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(op, backward, *args):
        return tuple(backward(*args))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise _no_second_derivative(ctx.op)

    @staticmethod
    def jvp(ctx, *tangents):
        raise _no_forward_mode(ctx.op)


def _differentiable(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def transformable(op: str, forward: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """An autograd.Function for one op: forward(*inputs) -> an output or a tuple of them, and
    backward(grad_outputs, inputs, outputs) -> the gradients of the floating-point tensor inputs, in
    order (the other inputs, such as flags, None and integer indices, get none). grad_outputs has a
    tensor for every output (zeros where nothing flowed)."""

    class Transformable(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*inputs):
            return forward(*inputs)

        @staticmethod
        def setup_context(ctx, inputs, output):
            outputs = output if isinstance(output, tuple) else (output,)
            ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)), *outputs)
            ctx.constants = [None if isinstance(t, torch.Tensor) else t for t in inputs]
            ctx.is_tensor = [isinstance(t, torch.Tensor) for t in inputs]

        @staticmethod
        def backward(ctx, *grad_outputs):
            saved = ctx.saved_tensors
            tensors = iter(saved)
            inputs = [next(tensors) if is_tensor else constant for constant, is_tensor in zip(ctx.constants, ctx.is_tensor)]
            outputs = saved[len(saved) - len(grad_outputs):]
            count = len(grad_outputs)
            flat = lambda *args: backward(args[:count], args[count:count + len(inputs)], args[count + len(inputs):])
            grads = iter(_FirstOrderBackward.apply(op, flat, *grad_outputs, *inputs, *outputs))
            return tuple(next(grads) if _differentiable(t) else None for t in inputs)

        @staticmethod
        def jvp(ctx, *tangents):
            raise _no_forward_mode(op)

    Transformable.__name__ = Transformable.__qualname__ = f"Transformable[{op}]"
    return Transformable


def vmap_by_loop(op, info, in_dims, *args):
    """A vmap rule that calls `op` once per batch element and stacks the results (as functorch's
    fallback does, without its warning that asks for a rule in PyTorch itself). Trailing arguments
    left at their schema defaults have no in_dims entry and are left out."""
    def element(i):
        return op(*(a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a
                    for a, d in zip(args, in_dims)))

    outs = [element(i) for i in range(info.batch_size)]
    if isinstance(outs[0], (tuple, list)):
        return tuple(torch.stack(parts) for parts in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


def vmap_by_folding(op, info, in_dims, args, foldable):
    """A vmap rule for an op whose arguments at the positions `foldable` (activations) and whose outputs
    share a leading batch dim. When only those are vmapped, one call with the vmapped dim folded into
    that batch (an unvmapped one is repeated for each element); otherwise (a weight is vmapped)
    vmap_by_loop. An output without that leading dim (an empty tensor) is the same for every element."""
    if any(d is not None and i not in foldable for i, d in enumerate(in_dims)):
        return vmap_by_loop(op, info, in_dims, *args)
    size = info.batch_size
    rows = None

    def fold(i, a):
        nonlocal rows
        if i not in foldable or not isinstance(a, torch.Tensor):
            return a
        a = a.movedim(in_dims[i], 0) if in_dims[i] is not None else a.expand(size, *a.shape)
        rows = a.shape[1]
        return a.reshape(size * rows, *a.shape[2:])

    outs = op(*(fold(i, a) for i, a in enumerate(args)))

    def unfold(out):
        if out.dim() and out.shape[0] == size * rows:
            return out.unflatten(0, (size, rows)), 0
        return out, None

    if isinstance(outs, (tuple, list)):
        outs, dims = zip(*(unfold(o) for o in outs))
        return tuple(outs), tuple(dims)
    return unfold(outs)


def register_vmap_by_loop(name: str) -> None:
    """Registers vmap_by_loop as the vmap rule of torch.ops.shammie.<name>: for the backward ops, whose
    per-element weight gradients (per-sample gradients) take one call per element, and for ops with no
    cheaper rule."""
    op = getattr(torch.ops.shammie, name)

    def rule(info, in_dims, *args):
        return vmap_by_loop(op, info, in_dims, *args)

    torch.library.register_vmap(f"shammie::{name}")(rule)
