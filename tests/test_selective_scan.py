"""selective_scan_fn: forward, last state and gradients against a float64 sequential reference written
from the math; N from 1 to 256; L = 1 and L across checkpoint intervals and sub-chunks; variable,
grouped and constant B / C; with and without D, z, delta_bias and softplus; every dtype; every CPU
instruction-set copy; gradcheck, opcheck, torch.compile(fullgraph=True), and bad input."""

import pytest
import torch

import shammie
from shammie.reference.selective_scan import selective_scan_reference
from shammie.selective_scan import checkpoint_interval
from conftest import (DEVICES, DTYPES, EMULATING_CUDA, assert_differentiable_once, assert_matches_reference,
                      assert_torch_func_transforms, assert_vmap_rule, compile_fullgraph, runs_cuda_kernels)

LOW = ("u", "delta", "z")          # in the activation dtype; B / C too unless constant
ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make(batch, dim, L, N, bc="variable", groups=2, D=True, z=True, bias=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    shape_bc = {"variable": (batch, N, L), "grouped": (batch, groups, N, L), "constant": (dim, N)}[bc]
    t = dict(u=r(batch, dim, L), delta=r(batch, dim, L) * 0.5, A=-torch.rand(dim, N, generator=g, dtype=torch.float64) * 2,
             B=r(*shape_bc), C=r(*shape_bc) * 0.5, D=r(dim) if D else None, z=r(batch, dim, L) if z else None,
             delta_bias=r(dim) * 0.3 if bias else None)
    low = set(LOW) | ({"B", "C"} if bc != "constant" else set())
    return {k: None if v is None else v.to(device=device, dtype=dtype if k in low else torch.float32) for k, v in t.items()}


def references(inputs, softplus, dtype):
    """float64 reference, and the reference on the same rounded inputs in the kernel's math dtype."""
    to = lambda d: {k: None if v is None else v.detach().cpu().to(d) for k, v in inputs.items()}
    ref = selective_scan_reference(**to(torch.float64), delta_softplus=softplus, return_last_state=True)
    low_inputs = {k: None if v is None else v.detach().cpu() for k, v in inputs.items()}
    low = selective_scan_reference(**low_inputs, delta_softplus=softplus, return_last_state=True)
    return ref, low


CASES = {
    "L=1 N=16": dict(batch=2, dim=6, L=1, N=16),
    "L=77 N=16 (sub-chunk and interval tails)": dict(batch=2, dim=20, L=77, N=16),
    "L=77 N=16 grouped": dict(batch=2, dim=20, L=77, N=16, bc="grouped", groups=4),
    "L=45 N=16 constant B/C": dict(batch=2, dim=18, L=45, N=16, bc="constant"),
    "L=50 N=1": dict(batch=1, dim=3, L=50, N=1),
    "L=40 N=4 no D/z/bias": dict(batch=2, dim=5, L=40, N=4, D=False, z=False, bias=False),
    "L=300 N=64 (three intervals)": dict(batch=1, dim=3, L=300, N=64),
    "L=600 N=256 (two intervals of 16 sub-chunks)": dict(batch=1, dim=2, L=600, N=256),
    "empty batch": dict(batch=0, dim=4, L=10, N=8),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("softplus", [False, True])
def test_forward_and_last_state_match_reference(case, dtype, device, softplus):
    inputs = make(**CASES[case], dtype=dtype, device=device)
    if not softplus:   # a positive step, as a softplus would give; a negative one makes the state explode
        inputs["delta"] = inputs["delta"].abs()
    else:              # and a few steps on softplus's pass-through branch (> 20)
        inputs["delta"].view(-1)[::7] += 25
    (ref_out, ref_state), (low_out, low_state) = references(inputs, softplus, dtype)
    out, state = shammie.selective_scan_fn(**inputs, delta_softplus=softplus, return_last_state=True)
    slack = scan_order_slack(case, device)
    assert_matches_reference(out, ref_out, low_out, "out", slack)
    math = torch.float64 if dtype == torch.float64 else torch.float32
    assert_matches_reference(state, ref_state, low_state.to(math), "last state", slack)


def scan_order_slack(case, device):
    """The CUDA kernel combines a long sequence's intervals and sub-chunks in a tree, where the
    reference steps one at a time: on the H200 its float32 error at L = 300 and 600 was 4.6 to 6.9
    times the sequential float32 reference's (relative to the output's scale, 4e-6 at most)."""
    return 4.0 if runs_cuda_kernels(device) and CASES[case]["L"] >= 300 else 1.0


def gradients(fn, inputs, softplus, seed=1):
    """Gradients of a random linear function of (out, last state) w.r.t. every tensor input."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    out, state = fn(**{**inputs, **leaves}, delta_softplus=softplus, return_last_state=True)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    w_state = torch.randn(state.shape, generator=g, dtype=torch.float64).to(state.device, state.dtype)
    loss = (out * w_out).sum() + (state * w_state).sum()
    return dict(zip(leaves, torch.autograd.grad(loss.float() if loss.dtype != torch.float64 else loss, list(leaves.values()))))


GRAD_CASES = ["L=1 N=16", "L=77 N=16 (sub-chunk and interval tails)", "L=77 N=16 grouped", "L=45 N=16 constant B/C",
              "L=40 N=4 no D/z/bias", "L=300 N=64 (three intervals)", "L=600 N=256 (two intervals of 16 sub-chunks)"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_match_reference(case, dtype, device):
    inputs = make(**CASES[case], dtype=dtype, device=device)
    got = gradients(shammie.selective_scan_fn, inputs, True)
    cpu = {k: None if v is None else v.detach().cpu() for k, v in inputs.items()}
    ref = gradients(selective_scan_reference, {k: None if v is None else v.double() for k, v in cpu.items()}, True)
    low = gradients(selective_scan_reference, cpu, True)
    for name in got:
        assert_matches_reference(got[name], ref[name], low[name], f"grad {name}", scan_order_slack(case, device))


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_cpu_instruction_set_copy(isa, monkeypatch):
    monkeypatch.setenv("SHAMMIE_CPU_ISA", isa)
    inputs = make(2, 20, 77, 16, bc="grouped", groups=2)
    (ref_out, _), (low_out, _) = references(inputs, True, torch.float32)
    assert_matches_reference(shammie.selective_scan_fn(**inputs, delta_softplus=True), ref_out, low_out, f"out [{isa}]")
    got = gradients(shammie.selective_scan_fn, inputs, True)
    ref = gradients(selective_scan_reference, {k: None if v is None else v.double() for k, v in inputs.items()}, True)
    low = gradients(selective_scan_reference, inputs, True)
    for name in got:
        assert_matches_reference(got[name], ref[name], low[name], f"grad {name} [{isa}]")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checkpoints", [1, 3])
def test_last_state_is_its_own_tensor(checkpoints, device):
    # The decode cache keeps the last state: a view would keep every checkpoint alive, and the decode
    # step writing it in place would overwrite a checkpoint autograd saved for the backward.
    N = 4
    inputs = make(1, 3, checkpoints * checkpoint_interval(N), N, device=device)
    inputs["u"].requires_grad_()
    out, last = shammie.selective_scan_fn(**inputs, return_last_state=True)
    assert last._base is None and last.untyped_storage().nbytes() == last.numel() * last.element_size()
    expected = torch.autograd.grad(out.sum(), inputs["u"], retain_graph=True)[0]
    with torch.no_grad():
        shammie.selective_state_update(last, torch.randn(1, 3, device=device), torch.rand(1, 3, device=device),
                                       inputs["A"], torch.randn(1, N, device=device), torch.randn(1, N, device=device))
    torch.testing.assert_close(torch.autograd.grad(out.sum(), inputs["u"])[0], expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bc", ["variable", "grouped", "constant"])
def test_gradcheck(bc, device):
    inputs = make(1, 4, 2 * checkpoint_interval(4) + 3, 4, bc=bc, dtype=torch.float64, device=device)
    inputs = {k: None if v is None else v.double().requires_grad_(True) for k, v in inputs.items()}

    def fn(*args):
        out, state = shammie.selective_scan_fn(*args, delta_softplus=True, return_last_state=True)
        return out, state

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in ORDER), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_transforms(device):
    """grad (through the last state too), per-sample gradients and jacrev (shammie/_functorch.py)."""
    inputs = make(3, 4, 2 * checkpoint_interval(4) + 3, 4, bc="constant", z=False, dtype=torch.float64, device=device)
    # delta and z from u, so that each batch row is one example
    fn = lambda u, A, B, C, D, bias: shammie.selective_scan_fn(u, 0.3 * u, A, B, C, D, 0.5 * u, bias, delta_softplus=True)
    assert_torch_func_transforms(fn, [inputs[k] for k in ("u", "A", "B", "C", "D", "delta_bias")], "selective_scan")
    inputs = make(2, 4, 40, 4, bc="grouped", groups=2, dtype=torch.float64, device=device)
    args = [inputs[k] for k in ORDER]

    def loss(*args):
        out, last = shammie.selective_scan_fn(*args, delta_softplus=True, return_last_state=True)
        return out.square().sum() + last.square().sum()

    leaves = [t.clone().requires_grad_() for t in args]
    for got, want in zip(torch.func.grad(loss, argnums=tuple(range(len(args))))(*args),
                         torch.autograd.grad(loss(*leaves), leaves)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bc", ["variable", "grouped", "constant"])
def test_vmap_folds_the_activations_into_the_batch(bc, device):
    """vmap over u, delta, z (and a variable or grouped B / C) is one call with the vmapped dim folded
    into the batch; vmap over A, or over a constant B, runs once per element."""
    t = make(2, 4, 40, 4, bc=bc, groups=2, device=device)
    three = lambda x: torch.stack([x, 0.5 * x, -x])
    scan = lambda u, delta, A, B, z: shammie.selective_scan_fn(u, delta, A, B, t["C"], t["D"], z, t["delta_bias"],
                                                                delta_softplus=True, return_last_state=True)
    args = [three(t["u"]), t["delta"], t["A"], three(t["B"]), three(t["z"])]
    assert_vmap_rule("selective_scan", scan, args, (0, None, None, 0, 0), folds=bc != "constant")
    assert_vmap_rule("selective_scan", scan, [args[0], *(t[k] for k in ("delta", "A", "B", "z"))],
                     (0, None, None, None, None), folds=True)
    assert_vmap_rule("selective_scan", scan, [t["u"], t["delta"], three(t["A"]), t["B"], t["z"]],
                     (None, None, 0, None, None), folds=False)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_and_forward_mode_ad_are_clear_errors(device):
    inputs = make(1, 4, 9, 4, dtype=torch.float64, device=device)
    leaves = [inputs[k].requires_grad_() for k in ORDER]
    fn = lambda *args: shammie.selective_scan_fn(*args, delta_softplus=True)
    assert_differentiable_once(fn, leaves, "selective_scan")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    inputs = make(2, 8, 40, 16, device=device)
    args = tuple(inputs[k] for k in ORDER)
    torch.library.opcheck(torch.ops.shammie.selective_scan, (*args, True))
    torch._dynamo.reset()
    leaves = [a.detach().clone().requires_grad_(True) if a is not None else None for a in args]

    def step(u, delta, A, B, C, D, z, delta_bias):
        out, state = shammie.selective_scan_fn(u * 1.5, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                                               return_last_state=True)
        return out.square().sum() + state.sum()

    eager = step(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = compile_fullgraph(step, device)(*leaves)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bc", ["variable", "constant"])
def test_backward_is_deterministic_across_threads(bc):
    # Per-channel gradients (dA, dD, ...) sum over the batch, whose items run on different threads.
    inputs = make(8, 16, 70, 8, bc=bc)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        first = gradients(shammie.selective_scan_fn, inputs, True)
        for _ in range(10):
            again = gradients(shammie.selective_scan_fn, inputs, True)
            for name in first:
                assert torch.equal(first[name], again[name]), f"grad {name} changed between identical runs"
    finally:
        torch.set_num_threads(threads)


def test_non_contiguous_inputs():
    inputs = make(2, 8, 33, 16)
    strided = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if k in ("u", "delta", "z", "B", "C") else v
               for k, v in inputs.items()}
    torch.testing.assert_close(shammie.selective_scan_fn(**strided, delta_softplus=True),
                               shammie.selective_scan_fn(**inputs, delta_softplus=True))


BAD = [
    (dict(u=torch.randn(2, 8)), ValueError, r"u must be 3-D \(batch, dim, seqlen\)"),
    (dict(delta=torch.randn(2, 8, 9)), ValueError, "delta must have shape"),
    (dict(delta=torch.randn(2, 8, 12, dtype=torch.float64)), TypeError, "delta must have the same dtype as u"),
    (dict(z=torch.randn(2, 8, 9)), ValueError, "z must have shape"),
    (dict(A=torch.randn(8, 300)), ValueError, r"1 <= dstate <= 256"),
    (dict(A=torch.randn(7, 16)), ValueError, r"A must have shape \(dim, dstate\)"),
    (dict(A=torch.complex(torch.randn(8, 16), torch.randn(8, 16))), TypeError, "complex A is not supported"),
    (dict(B=torch.randn(2, 16, 11)), ValueError, "B must have shape"),
    (dict(B=torch.randn(2, 3, 16, 12), C=torch.randn(2, 3, 16, 12)), ValueError, "must be a multiple of B's ngroups"),
    (dict(B=torch.randn(2, 2, 16, 12), C=torch.randn(2, 4, 16, 12)), ValueError, "B and C must have the same ngroups"),
    (dict(C=torch.randn(2, 16)), ValueError, "C must have shape"),
    (dict(D=torch.randn(5)), ValueError, r"D must have shape \(dim,\)"),
    (dict(delta_bias=torch.randn(8, 1)), ValueError, r"delta_bias must have shape \(dim,\)"),
    (dict(u=torch.randint(0, 3, (2, 8, 12))), TypeError, "u must be float32, float16, bfloat16 or float64"),
    (dict(C=torch.randn(2, 16, 12, device="meta")), ValueError, "C must be on the same device as u"),
]


@pytest.mark.parametrize("change,error,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_a_clear_error(change, error, message):
    good = make(2, 8, 12, 16)
    with pytest.raises(error, match=message):
        shammie.selective_scan_fn(**{**good, **change}, delta_softplus=True)


DETERMINISTIC_CASES = {
    # On the CUDA emulation (4 SMs) these take 2 rounds per block, and blocks span both groups.
    "grouped, several rounds per block": dict(batch=8, dim=66, L=40, N=16, bc="grouped", groups=2),
    "workspace cap forces rounds": dict(batch=2, dim=12, L=100, N=64, bc="grouped", groups=2, workspace_mb=1),
    "variable, one round per block": dict(batch=2, dim=20, L=77, N=16),
    "N=128 (one channel per round)": dict(batch=2, dim=3, L=100, N=128),
    "constant B/C": dict(batch=4, dim=18, L=45, N=16, bc="constant"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(DETERMINISTIC_CASES))
def test_deterministic_backward(case, dtype, device, monkeypatch):
    """Under torch.use_deterministic_algorithms the CUDA backward adds in a fixed order instead of with
    float atomics (csrc/selective_scan/selective_scan_deterministic.cuh): its gradients match the
    reference, and two runs agree bit for bit; on the CUDA emulation also with the blocks and threads
    run in reverse order, which changes the default backward's sums."""
    spec = dict(DETERMINISTIC_CASES[case])
    if "workspace_mb" in spec:
        monkeypatch.setenv("SHAMMIE_SCAN_WORKSPACE_MB", str(spec.pop("workspace_mb")))
    inputs = make(**spec, dtype=dtype, device=device)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [gradients(shammie.selective_scan_fn, inputs, True) for _ in range(2)]
        if EMULATING_CUDA:
            monkeypatch.setenv("SHAMMIE_EMU_THREAD_ORDER", "reverse")
            runs.append(gradients(shammie.selective_scan_fn, inputs, True))
    finally:
        torch.use_deterministic_algorithms(False)
    cpu = {k: None if v is None else v.detach().cpu() for k, v in inputs.items()}
    ref = gradients(selective_scan_reference, {k: None if v is None else v.double() for k, v in cpu.items()}, True)
    low = gradients(selective_scan_reference, cpu, True)
    for name in runs[0]:
        assert_matches_reference(runs[0][name], ref[name], low[name], f"grad {name}")
        for again in runs[1:]:
            assert torch.equal(runs[0][name], again[name]), f"grad {name} changed between identical runs"
    if EMULATING_CUDA and case == "grouped, several rounds per block" and dtype == torch.float32:
        # The default backward's atomics do depend on the order, so the comparison above can fail.
        reverse = gradients(shammie.selective_scan_fn, inputs, True)
        monkeypatch.setenv("SHAMMIE_EMU_THREAD_ORDER", "forward")
        forward = gradients(shammie.selective_scan_fn, inputs, True)
        assert any(not torch.equal(forward[k], reverse[k]) for k in ("B", "C", "A", "D", "delta_bias"))
