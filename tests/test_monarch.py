"""blockdiag_butterfly_multiply: against a float64 reference from the math, on both devices,
every dtype and instruction-set copy; gradcheck, opcheck, torch.compile, and bad input."""

import pytest
import torch

import shammie
from shammie.reference.monarch import monarch_bmm, monarch_reference
from conftest import (DEVICES, DTYPES, EMULATING_CUDA, assert_differentiable_once, assert_matches_reference,
                      assert_torch_func_transforms, compile_fullgraph)

op = torch.ops.shammie.blockdiag_butterfly_multiply

# (batch shape, k, q, p, l, s, r), with l·r = k·q; output width l·s.
SHAPES = {
    "square-blocks": ((7,), 4, 4, 4, 4, 4, 4),
    "rectangular": ((5, 3), 2, 6, 4, 3, 5, 4),         # l·s = 15 ≠ n = 8
    "k=1": ((9,), 1, 6, 7, 3, 2, 2),
    "l!=k": ((4,), 2, 8, 5, 4, 3, 4),
    "q!=r": ((11,), 4, 2, 3, 2, 5, 4),
    "odd": ((37,), 3, 5, 7, 5, 9, 3),                  # 37 tokens: a partial tile
    "wide-q-r": ((6,), 2, 32, 33, 4, 17, 16),          # q, r ≥ 16: the AXPY forms on CPU
    "more-like": ((2, 17), 4, 4, 64, 4, 64, 4),
    "wide-u": ((3,), 16, 1024, 2, 128, 8, 128),      # k·q = 16384: on CUDA, u lives in global scratch
    # l dividing or divided by the vector width: the CPU forward's output-order path, with column tails
    "l=16": ((19,), 8, 4, 8, 16, 3, 2),
    "l=32": ((7,), 4, 8, 3, 32, 5, 1),
    "l=8": ((5,), 2, 4, 6, 8, 7, 1),
    "l=1": ((6,), 3, 2, 5, 1, 40, 6),
    "no-batch": ((), 2, 3, 4, 3, 5, 2),
    "empty-batch": ((0,), 2, 3, 4, 3, 5, 2),
    "empty-inner-batch": ((3, 0), 2, 3, 4, 3, 5, 2),
    "many-tokens": ((2, 150), 4, 8, 16, 8, 6, 4),
}


def make_inputs(shape, dtype, device, seed=0):
    batch, k, q, p, l, s, r = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, k * p, generator=g, dtype=torch.float64)
    w1 = torch.randn(k, q, p, generator=g, dtype=torch.float64) / p**0.5
    w2 = torch.randn(l, s, r, generator=g, dtype=torch.float64) / r**0.5
    return [t.to(device=device, dtype=dtype) for t in (x, w1, w2)]


def reference_with_grads(inputs, grad, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = monarch_reference(*leaves)
    out.backward(grad.to(dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("impl", ["kernel", "gemm", "dense"])
def test_forward_backward_match_reference(impl, name, dtype, device, monkeypatch):
    # Every implementation on every device: the fused kernels, the batched GEMMs and the dense GEMMs
    # (cuBLAS on CUDA).
    monkeypatch.setenv("SHAMMIE_MONARCH_IMPL", impl)
    check_against_reference(name, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_auto_implementation_on_many_tokens(device, monkeypatch):
    # auto takes the GEMMs on CUDA from 128 tokens up; a bad value is a clear error.
    monkeypatch.delenv("SHAMMIE_MONARCH_IMPL", raising=False)
    check_against_reference("many-tokens", torch.float32, device)
    monkeypatch.setenv("SHAMMIE_MONARCH_IMPL", "fast")
    with pytest.raises(ValueError, match="SHAMMIE_MONARCH_IMPL must be one of auto, kernel, gemm, dense; got 'fast'"):
        shammie.blockdiag_butterfly_multiply(*make_inputs(SHAPES["odd"], torch.float32, device))


@pytest.mark.parametrize("isa", ["base", "avx512"])
@pytest.mark.parametrize("name", ["odd", "more-like", "l=16", "square-blocks"])
def test_bf16_with_and_without_bf16_dot_products(name, isa, monkeypatch):
    # bf16 u comes from AVX512-BF16 dot products where the processor has them (narrow q), else from
    # fp32 copies; SHAMMIE_CPU_ISA=base forces the latter. p = 7 and 64 leave masked tails.
    monkeypatch.setenv("SHAMMIE_CPU_ISA", isa)
    check_against_reference(name, torch.bfloat16, "cpu")


def check_against_reference(name, dtype, device):
    inputs = make_inputs(SHAPES[name], dtype, device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = shammie.blockdiag_butterfly_multiply(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad.to(device=device, dtype=dtype))

    cpu_inputs = [t.detach().cpu() for t in inputs]
    ref64, grads64 = reference_with_grads(cpu_inputs, grad, torch.float64)
    ref_low, grads_low = reference_with_grads(cpu_inputs, grad, dtype)
    assert_matches_reference(out.detach(), ref64, ref_low, "y")
    for label, leaf, g64, glow in zip(("grad x", "grad w1", "grad w2"), leaves, grads64, grads_low):
        assert_matches_reference(leaf.grad, g64, glow, label)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("name", ["odd", "wide-q-r", "more-like", "l=16", "l=32"])
def test_every_cpu_instruction_set_copy(name, isa, monkeypatch):
    # SHAMMIE_CPU_ISA caps the copy used; a processor without the ISA falls back to a lower one.
    monkeypatch.setenv("SHAMMIE_CPU_ISA", isa)
    inputs = make_inputs(SHAPES[name], torch.float32, "cpu")
    grad = torch.randn(op(*inputs).shape, dtype=torch.float32)
    gx, gw1, gw2 = torch.ops.shammie.blockdiag_butterfly_multiply_backward(grad, *inputs)
    ref64, grads64 = reference_with_grads(inputs, grad.double(), torch.float64)
    ref32, grads32 = reference_with_grads(inputs, grad, torch.float32)
    assert_matches_reference(op(*inputs), ref64, ref32, f"y [{isa}]")
    for label, got, g64, g32 in zip(("grad x", "grad w1", "grad w2"), (gx, gw1, gw2), grads64, grads32):
        assert_matches_reference(got, g64, g32, f"{label} [{isa}]")


@pytest.mark.skipif(EMULATING_CUDA, reason="checks the CPU kernels' dispatch, replaced under SHAMMIE_EMULATE_CUDA")
def test_cpu_isa_is_reported_and_validated(monkeypatch):
    assert shammie.build_info()["cpu_kernels"] in ("base", "avx2", "avx512")
    monkeypatch.setenv("SHAMMIE_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="SHAMMIE_CPU_ISA must be one of"):
        op(*make_inputs(SHAPES["odd"], torch.float32, "cpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_x(device):
    _, k, q, p, l, s, r = SHAPES["odd"]
    x_wide = torch.randn(37, 3 * k * p, dtype=torch.float64, device=device)
    row_strided = x_wide[:, 5 : 5 + k * p]                                         # unit inner stride
    column_major = torch.randn(k * p, 37, dtype=torch.float64, device=device).t()  # inner stride ≠ 1
    expanded = torch.randn(1, k * p, dtype=torch.float64, device=device).expand(6, -1)  # stride-0 rows
    _, w1, w2 = make_inputs(SHAPES["odd"], torch.float64, device)
    for x in (row_strided, column_major, expanded):
        assert not x.is_contiguous()
        torch.testing.assert_close(op(x, w1, w2), monarch_reference(x.contiguous(), w1, w2))
        grad = torch.randn(x.shape[0], l * s, dtype=torch.float64, device=device)
        got = torch.ops.shammie.blockdiag_butterfly_multiply_backward(grad, x, w1, w2)
        leaves = [t.detach().clone(memory_format=torch.contiguous_format).requires_grad_() for t in (x, w1, w2)]
        monarch_reference(*leaves).backward(grad)
        for g, leaf in zip(got, leaves):
            torch.testing.assert_close(g, leaf.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_of_expanded_output_gradient(device):
    # y.sum().backward() hands the op a stride-0 grad_out.
    x, w1, w2 = [t.requires_grad_() for t in make_inputs(SHAPES["l!=k"], torch.float64, device)]
    shammie.blockdiag_butterfly_multiply(x, w1, w2).sum().backward()
    xr, w1r, w2r = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    monarch_reference(xr, w1r, w2r).sum().backward()
    for got, want in ((x, xr), (w1, w1r), (w2, w2r)):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["rectangular", "odd", "wide-q-r"])
def test_gradcheck(name, device):
    batch, k, q, p, l, s, r = SHAPES[name]
    inputs = [t.requires_grad_() for t in make_inputs(((3,), k, q, p, l, s, r), torch.float64, device)]
    assert torch.autograd.gradcheck(shammie.blockdiag_butterfly_multiply, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_and_forward_mode_ad_are_clear_errors(device):
    batch, k, q, p, l, s, r = SHAPES["rectangular"]
    inputs = [t.requires_grad_() for t in make_inputs(((3,), k, q, p, l, s, r), torch.float64, device)]
    assert_differentiable_once(shammie.blockdiag_butterfly_multiply, inputs, "blockdiag_butterfly_multiply")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_transforms(device):
    """grad, per-sample gradients, jacrev (shammie/_functorch.py), and vmap over stacked factors."""
    f = shammie.blockdiag_butterfly_multiply
    batch, k, q, p, l, s, r = SHAPES["rectangular"]
    x, w1, w2 = make_inputs(((5,), k, q, p, l, s, r), torch.float64, device)
    assert_torch_func_transforms(f, [x, w1, w2], "blockdiag_butterfly_multiply")
    stacked = torch.stack([w1, 2 * w1])
    torch.testing.assert_close(torch.func.vmap(lambda w: f(x, w, w2))(stacked), torch.stack([f(x, w, w2) for w in stacked]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["rectangular", "no-batch", "empty-batch"])
def test_opcheck(name, device):
    x, w1, w2 = make_inputs(SHAPES[name], torch.float32, device)
    torch.library.opcheck(op, (x, w1, w2))
    torch.library.opcheck(op, (x.requires_grad_(), w1.requires_grad_(), w2.requires_grad_()))
    grad = torch.randn(*x.shape[:-1], w2.shape[0] * w2.shape[1], device=device)
    torch.library.opcheck(torch.ops.shammie.blockdiag_butterfly_multiply_backward, (grad, x.detach(), w1.detach(), w2.detach()))


class MonarchLinear(torch.nn.Module):
    def __init__(self, k, q, p, l, s, r):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(k, q, p) / p**0.5)
        self.w2 = torch.nn.Parameter(torch.randn(l, s, r) / r**0.5)

    def forward(self, x):
        return torch.nn.functional.gelu(shammie.blockdiag_butterfly_multiply(x * 2, self.w1, self.w2))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    _, k, q, p, l, s, r = SHAPES["l!=k"]
    model = MonarchLinear(k, q, p, l, s, r).to(device)
    compiled = compile_fullgraph(model, device)
    x = torch.randn(3, 5, k * p, device=device)
    eager_out = model(x)
    eager_out.sum().backward()
    eager_grads = [p_.grad.clone() for p_ in model.parameters()]
    model.zero_grad()
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager_out)
    for got, want in zip([p_.grad for p_ in model.parameters()], eager_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_bmm_peer(device):
    inputs = make_inputs(SHAPES["more-like"], torch.float32, device)
    torch.testing.assert_close(shammie.blockdiag_butterfly_multiply(*inputs), monarch_bmm(*inputs), rtol=1e-4, atol=1e-5)


# ---- bad input: a clear error naming the argument, from the kernel and from the fake ---------

def _bad_cases(device):
    x, w1, w2 = make_inputs(SHAPES["odd"], torch.float32, device)
    return {
        "x 0-d": ((torch.tensor(1.0, device=device), w1, w2), ValueError, "x must have at least 1"),
        "w1 rank": ((x, w1[0], w2), ValueError, "w1_bfly must be 3-D"),
        "w2 rank": ((x, w1, w2.flatten(1)), ValueError, "w2_bfly must be 3-D"),
        "k*p != n": ((x[:, :-1], w1, w2), ValueError, "x's last dimension must equal k·p"),
        "l*r != k*q": ((x, w1, w2[:, :, :-1]), ValueError, "needs l·r = k·q"),
        "mixed dtypes": ((x, w1.double(), w2), TypeError, "w1_bfly must have the same dtype as x"),
        "integer dtype": ((x.long(), w1.long(), w2.long()), TypeError, "x must be float32, float16, bfloat16 or float64"),
        "mixed devices": ((x, w1, w2.to("meta")), ValueError, "w2_bfly must be on the same device as x"),
        "zero-size w1": ((x[:, :0], w1[:, :, :0], w2), ValueError, "w1_bfly must have non-zero sizes"),
        "zero-size w2": ((x, w1, w2[:, :0]), ValueError, "w2_bfly must have non-zero sizes"),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_input_is_a_clear_error(case, device):
    args, error, message = _bad_cases(device)[case]
    with pytest.raises(error, match=message):
        shammie.blockdiag_butterfly_multiply(*args)
    meta_args = [a.to("meta") for a in args]       # the registered fake gives the same error
    if case != "mixed devices":
        with pytest.raises(error, match=message):
            shammie.blockdiag_butterfly_multiply(*meta_args)


def test_backward_checks_grad_out():
    x, w1, w2 = make_inputs(SHAPES["odd"], torch.float32, "cpu")
    with pytest.raises(ValueError, match="grad_out must have shape"):
        torch.ops.shammie.blockdiag_butterfly_multiply_backward(torch.randn(37, 3), x, w1, w2)
    with pytest.raises(TypeError, match="grad_out must have the same dtype as x"):
        torch.ops.shammie.blockdiag_butterfly_multiply_backward(torch.randn(37, 45).double(), x, w1, w2)


def test_64bit_offsets_in_the_shape_arithmetic():
    # A (2^31 / n + 1)-token input would need 8 GiB; check the size arithmetic on meta tensors.
    n = 4096
    x = torch.empty(2**31 // n + 7, n, device="meta")
    w1 = torch.empty(4, 4, n // 4, device="meta")
    w2 = torch.empty(4, n // 4, 4, device="meta")
    assert shammie.blockdiag_butterfly_multiply(x, w1, w2).shape == (2**31 // n + 7, n)
