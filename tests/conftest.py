"""Shared test helpers: devices, dtypes, and tolerances tied to the reference's own error."""

import os
import sys

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# SHAMMIE_EMULATE_CUDA=1: the CPU kernels are replaced by the CPU emulation of the CUDA kernels (see
# pytest_configure below), so tolerances that depend on the CUDA kernels' order of sums apply on CPU too.
EMULATING_CUDA = os.environ.get("SHAMMIE_EMULATE_CUDA") == "1"


def runs_cuda_kernels(device) -> bool:
    return torch.device(device).type == "cuda" or EMULATING_CUDA

# Floor under the tolerance, relative to the output's scale: the kernel may not be worse than
# twice the error of the same reference computed in the kernel's dtype, plus this.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_matches_reference(out, ref64, ref_lowp, what="output", slack=1.0):
    """out: kernel result; ref64: float64 reference; ref_lowp: the reference run in out's dtype.
    slack scales the allowance over the reference's own error, for kernels that sum in another order."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == ref_lowp.dtype, f"{what}: dtype {out.dtype} != {ref_lowp.dtype}"
    if ref64.numel() == 0:
        return
    scale = ref64.abs().max().item() or 1.0
    kernel_err = (out.double().cpu() - ref64.cpu()).abs().max().item()
    reference_err = (ref_lowp.double().cpu() - ref64.cpu()).abs().max().item()
    bound = 2 * slack * reference_err + FLOOR[out.dtype] * scale
    assert kernel_err <= bound, (
        f"{what} ({out.dtype}): max error {kernel_err:.3g} > bound {bound:.3g} "
        f"(reference in {out.dtype} errs by {reference_err:.3g}, scale {scale:.3g})"
    )


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def run_example(name, *args, timeout=600):
    """Run examples/<name> in a subprocess that imports this checkout's shammie (installed or not)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(REPO / "examples" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def compile_fullgraph(fn, device):
    """torch.compile(fn, fullgraph=True). On CUDA with the aot_eager backend: the same graph capture, fake
    kernels and autograd tracing, without Inductor's Triton code generation, which would spend minutes of
    a time-limited GPU session (the CPU runs exercise Inductor)."""
    backend = "inductor" if torch.device(device).type == "cpu" else "aot_eager"
    return torch.compile(fn, fullgraph=True, backend=backend)


def assert_compiled_matches_eager(step, leaves, **tolerance):
    """torch.compile(step, fullgraph=True) gives step's scalar and its gradients w.r.t. the leaves."""
    eager = step(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    compiled = compile_fullgraph(step, leaves[0].device)(*leaves)
    torch.testing.assert_close(compiled, eager, **tolerance)
    for got, want in zip(torch.autograd.grad(compiled, leaves), eager_grads):
        torch.testing.assert_close(got, want, **tolerance)


def assert_differentiable_once(fn, leaves, op):
    """create_graph=True through fn gives the usual gradients, and differentiating those again raises a
    clear error naming op (the backward ops have no derivatives: never silent zeros); forward-mode AD
    through fn raises too."""
    loss = lambda: sum(out.square().sum() for out in _tensors(fn(*leaves)))
    want = torch.autograd.grad(loss(), leaves)
    grads = torch.autograd.grad(loss(), leaves, create_graph=True)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got.detach(), expected)
    message = f"{op}: differentiating its gradients again"
    with pytest.raises(RuntimeError, match=message):
        sum(g.sum() for g in grads).backward()
    with pytest.raises(RuntimeError, match=message):   # reached through the weights' edges too
        torch.autograd.grad(grads[0].sum(), leaves[-1])
    # Forward mode has no formulas either: an error, where torch.library's Python autograd returned
    # zero tangents.
    primals = [t.detach() for t in leaves]
    with pytest.raises(RuntimeError, match="jvp is not implemented|functorch"):
        with torch.autograd.forward_ad.dual_level():
            fn(torch.autograd.forward_ad.make_dual(primals[0], torch.ones_like(primals[0])), *primals[1:])
    with pytest.raises(RuntimeError, match="jvp is not implemented|functorch"):
        torch.func.jvp(lambda first: fn(first, *primals[1:]), (primals[0],), (torch.ones_like(primals[0]),))


def assert_torch_func_transforms(fn, inputs, op):
    """torch.func.grad, vmap over grad (per-sample gradients of inputs[1:] over inputs[0]'s first dim),
    a backward through a vmapped call, and jacrev through fn (shammie/_functorch.py) agree with plain
    autograd; grad of grad and hessian (forward over reverse) are clear errors naming op."""
    inputs = [t.detach() for t in inputs]
    loss = lambda *args: fn(*args).square().sum()
    argnums = tuple(range(len(inputs)))
    leaves = [t.clone().requires_grad_() for t in inputs]
    for got, want in zip(torch.func.grad(loss, argnums=argnums)(*inputs), torch.autograd.grad(loss(*leaves), leaves)):
        torch.testing.assert_close(got, want)
    first, rest = inputs[0], inputs[1:]
    per_example = torch.func.vmap(torch.func.grad(lambda example, *rest: loss(example[None], *rest),
                                                  argnums=tuple(range(1, len(inputs)))),
                                  in_dims=(0, *(None,) * len(rest)))(first, *rest)
    for i in range(first.shape[0]):
        leaves = [t.clone().requires_grad_() for t in rest]
        for got, want in zip(per_example, torch.autograd.grad(loss(first[i:i + 1], *leaves), leaves)):
            torch.testing.assert_close(got[i], want)
    # vmap inside an ordinary training step: loss.backward() through the vmapped call
    leaves = [t.clone().requires_grad_() for t in inputs]
    torch.func.vmap(lambda example, *rest: loss(example[None], *rest), in_dims=(0, *(None,) * len(rest)))(
        *leaves).sum().backward()
    for leaf, want in zip(leaves, torch.func.grad(loss, argnums=argnums)(*inputs)):
        torch.testing.assert_close(leaf.grad, want)
    small = first[:1]
    torch.testing.assert_close(torch.func.jacrev(lambda a: fn(a, *rest))(small),
                               torch.autograd.functional.jacobian(lambda a: fn(a, *rest), small))
    with pytest.raises(RuntimeError, match=f"{op}: differentiating its gradients again"):
        torch.func.grad(lambda a: torch.func.grad(loss)(a, *rest).sum())(first)
    with pytest.raises(RuntimeError, match=f"{op}: forward-mode AD"):
        torch.func.hessian(lambda a: fn(a, *rest).sum())(small)


def assert_vmap_rule(op, fn, args, in_dims, folds):
    """torch.func.vmap(fn, in_dims)(*args) equals fn on each element, stacked; and the vmap rule of
    torch.ops.shammie.<op> called the op once (folds: the vmapped dim went into the op's batch) or
    once per element. The profiler sees the vmapped call itself too."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = torch.func.vmap(fn, in_dims=in_dims)(*args)
    calls = sum(e.name == f"shammie::{op}" for e in prof.events()) - 1
    size = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    elements = [fn(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(size)]
    want = tuple(map(torch.stack, zip(*elements))) if isinstance(got, tuple) else torch.stack(elements)
    torch.testing.assert_close(got, want)
    assert calls == (1 if folds else size), f"{op} ran {calls} times under vmap over {size} elements"


def _tensors(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


@pytest.fixture(autouse=True)
def _surface_cuda_errors():
    """Synchronize after each test that used the GPU, so an asynchronous kernel fault is charged to the
    test that caused it. Such a fault poisons the process's CUDA context for every later test, so under
    pytest-xdist (benchmarks/device_check.sh) the worker exits and xdist starts a fresh one."""
    yield
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as error:
        if os.environ.get("PYTEST_XDIST_WORKER"):
            sys.stderr.write(f"CUDA context lost after this test ({error}); restarting the worker\n")
            sys.stderr.flush()
            os._exit(70)
        raise


def pytest_configure(config):
    """SHAMMIE_EMULATE_CUDA=1: shammie's CPU kernels are replaced by the CPU emulation of its CUDA kernels
    (tests/cuda_emulation), so the CPU tests check the CUDA kernels' logic on a machine without a GPU."""
    if EMULATING_CUDA:
        sys.path.insert(0, str(REPO / "tests" / "cuda_emulation"))
        import build as cuda_emulation

        cuda_emulation.build()
