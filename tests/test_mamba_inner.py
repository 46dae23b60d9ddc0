"""mamba_inner_fn (Mamba's training path: conv → x_proj → dt_proj → scan with z gating → out_proj)
against a float64 reference composed from the math, with input-dependent and given B/C, projection
biases, and Falcon-Mamba's RMS norms (mamba_ssm's placement: B and C over dstate, delta after dt_proj);
outputs and gradients, float32 and bfloat16, and gradcheck."""

import pytest
import torch
import torch.nn.functional as F

import shammie
from shammie.reference.causal_conv1d import causal_conv1d_reference
from shammie.reference.selective_scan import selective_scan_reference
from shammie.benchmarks.harness import saved_bytes
from conftest import (assert_compiled_matches_eager, assert_differentiable_once, assert_matches_reference,
                      assert_torch_func_transforms)

BATCH, DIM, L, N, RANK, WIDTH, OUT = 2, 12, 21, 8, 3, 4, 10


def make(norms, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    t = dict(xz=r(BATCH, 2 * DIM, L), conv1d_weight=r(DIM, 1, WIDTH) * 0.5, conv1d_bias=r(DIM) * 0.1,
             x_proj_weight=r(RANK + 2 * N, DIM) * 0.3, delta_proj_weight=r(DIM, RANK) * 0.3,
             out_proj_weight=r(OUT, DIM) * 0.3, out_proj_bias=r(OUT) * 0.1,
             A=-torch.rand(DIM, N, generator=g, dtype=torch.float64) - 0.1, D=r(DIM), delta_bias=r(DIM) * 0.1)
    if bias:
        t.update(B_proj_bias=r(N) * 0.1, C_proj_bias=r(N) * 0.1)
    if norms:   # weights other than one, so a misplaced or dropped weight shows
        t.update(b_rms_weight=1 + 0.3 * r(N), c_rms_weight=1 + 0.3 * r(N), dt_rms_weight=1 + 0.3 * r(DIM))
    return t


def rms(x, weight, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def reference(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A,
              D, delta_bias, B_proj_bias=None, C_proj_bias=None, b_rms_weight=None, c_rms_weight=None,
              dt_rms_weight=None, eps=1e-6):
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d_reference(x, conv1d_weight[:, 0], conv1d_bias, activation="silu")
    dt, B, C = (x.transpose(1, 2) @ x_proj_weight.T).split([RANK, N, N], dim=-1)
    delta = dt @ delta_proj_weight.T
    if dt_rms_weight is not None:
        delta = rms(delta, dt_rms_weight, eps)
    if B_proj_bias is not None:
        B, C = B + B_proj_bias, C + C_proj_bias
    if b_rms_weight is not None:
        B, C = rms(B, b_rms_weight, eps), rms(C, c_rms_weight, eps)
    y = selective_scan_reference(x, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D, z,
                                 delta_bias, delta_softplus=True)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def shammie_call(t, checkpoint_lvl=1):
    return shammie.mamba_inner_fn(t["xz"], t["conv1d_weight"], t["conv1d_bias"], t["x_proj_weight"],
                                  t["delta_proj_weight"], t["out_proj_weight"], t["out_proj_bias"], t["A"], None,
                                  None, t["D"], t["delta_bias"], B_proj_bias=t.get("B_proj_bias"),
                                  C_proj_bias=t.get("C_proj_bias"), delta_softplus=True,
                                  b_rms_weight=t.get("b_rms_weight"), c_rms_weight=t.get("c_rms_weight"),
                                  dt_rms_weight=t.get("dt_rms_weight"), checkpoint_lvl=checkpoint_lvl)


def outputs_and_grads(fn, t):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}
    out = fn(leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weight).sum(), list(leaves.values()))
    return out.detach(), dict(zip(leaves, grads))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norms", [False, True], ids=["no norms", "Falcon-Mamba norms"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "B/C proj bias"])
@pytest.mark.parametrize("checkpoint_lvl", [0, 1])
def test_matches_reference(dtype, norms, bias, checkpoint_lvl):
    inputs = make(norms, bias)
    ref_of = lambda t: reference(**t)
    ref_out, ref_grads = outputs_and_grads(ref_of, inputs)
    low_inputs = {k: v.to(dtype) for k, v in inputs.items()}
    low_out, low_grads = outputs_and_grads(ref_of, low_inputs)   # the composite's roundings, in dtype
    out, grads = outputs_and_grads(lambda t: shammie_call(t, checkpoint_lvl), low_inputs)
    assert_matches_reference(out, ref_out, low_out.to(dtype), "out")
    for name, g in grads.items():
        assert_matches_reference(g, ref_grads[name], low_grads[name].to(g.dtype), f"grad {name}")


def test_double_backward_and_forward_mode_ad_are_clear_errors():
    t = {k: v.requires_grad_() for k, v in make(norms=False, bias=False).items()}
    assert_differentiable_once(lambda *args: shammie_call(dict(zip(t, args))), list(t.values()), "mamba_inner_fn")


@pytest.mark.parametrize("norms", [False, True], ids=["no norms", "Falcon-Mamba norms"])
def test_torch_func_transforms(norms):
    """Under torch.func the training path composes the conv and the scan, each transformable
    (shammie/_functorch.py): grad, per-sample gradients over xz's batch, and jacrev equal autograd
    through the recomputing Function."""
    t = make(norms, bias=norms)
    names = list(t)
    fn = lambda *args: shammie_call(dict(zip(names, args)))
    assert_torch_func_transforms(fn, list(t.values()), "(causal_conv1d|selective_scan)")


def test_gradcheck_with_norms():
    inputs = {k: v[:1, :, :9] if k == "xz" else v for k, v in make(True, True).items()}
    names = list(inputs)
    fn = lambda *args: shammie_call(dict(zip(names, args)))
    assert torch.autograd.gradcheck(fn, tuple(v.requires_grad_(True) for v in inputs.values()), eps=1e-6, atol=1e-5)


def test_checkpoint_lvl_1_keeps_less_and_gives_the_same_gradients():
    """Level 1 does not keep the conv output and delta: at least 2·batch·dim·L values less."""
    inputs = {k: v.float() for k, v in make(norms=True, bias=False).items()}
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    results = {}
    for level in (0, 1):
        out, kept = saved_bytes(lambda: shammie_call(leaves, level))
        grads = torch.autograd.grad(out.square().sum(), list(leaves.values()))
        results[level] = out.detach(), kept, grads
    (out0, kept0, grads0), (out1, kept1, grads1) = results[0], results[1]
    assert torch.equal(out0, out1)
    assert kept0 - kept1 >= 2 * BATCH * DIM * L * 4, f"level 0 keeps {kept0} bytes, level 1 {kept1}"
    for name, a, b in zip(leaves, grads0, grads1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {name}: {m}")


def test_only_some_inputs_need_gradients():
    """Frozen weights (fine-tuning a part of the model): gradients only where asked, on both levels."""
    inputs = {k: v.float() for k, v in make(norms=False, bias=True).items()}
    trainable = {"xz", "A", "delta_bias", "C_proj_bias"}
    want = None
    for level in (0, 1):
        leaves = {k: v.clone().requires_grad_(k in trainable) for k, v in inputs.items()}
        out = shammie_call(leaves, level)
        grads = dict(zip(trainable, torch.autograd.grad(out.sum(), [leaves[k] for k in trainable])))
        assert all(leaves[k].grad is None for k in leaves)
        if want is None:
            want = grads
        for k in trainable:
            torch.testing.assert_close(grads[k], want[k], rtol=1e-5, atol=1e-6)


def test_compile_fullgraph():
    inputs = {k: v.float().requires_grad_(True) for k, v in make(norms=True, bias=True).items()}

    def step(*args):
        return shammie_call(dict(zip(inputs, args))).square().sum()

    assert_compiled_matches_eager(step, list(inputs.values()), rtol=1e-4, atol=1e-5)


def test_bad_checkpoint_lvl():
    with pytest.raises(ValueError, match="checkpoint_lvl must be 0 or 1"):
        shammie_call(make(norms=False, bias=False), checkpoint_lvl=2)
