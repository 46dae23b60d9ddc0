"""mamba_chunk_scan_combined (Mamba-2's SSD scan): output, final state and gradients against a
sequential reference written from the math (shammie/reference/mamba2.py), in every dtype; groups,
D per head or per channel, z, dt_bias, softplus, dt_limit, initial states; L = 1, L = 0 and L across
the kernels' checkpoint intervals; every CPU instruction-set copy; gradcheck, opcheck,
torch.compile(fullgraph=True), determinism across thread counts, and bad input; each on both
implementations (SHAMMIE_SSD_IMPL = kernel | chunked)."""

import math
import warnings

import pytest
import torch

import shammie
from shammie.reference.mamba2 import ssd_scan_packed_reference, ssd_scan_reference, ssd_scan_varlen_reference
from shammie.benchmarks.harness import saved_bytes
from conftest import (DEVICES, DTYPES, assert_compiled_matches_eager, assert_differentiable_once, assert_matches_reference,
                      assert_torch_func_transforms, assert_vmap_rule)

@pytest.fixture(autouse=True, params=["kernel", "chunked"])
def impl(request, monkeypatch):
    """Every test on both implementations: the recurrence kernels, and the chunked matrix products."""
    monkeypatch.setenv("SHAMMIE_SSD_IMPL", request.param)
    return request.param


LOW = ("x", "dt", "B", "C", "z")      # in the activation dtype; A, D, dt_bias, initial_states in float32
NO_LIMIT = (0.0, math.inf)


def make(batch, L, heads, headdim, groups, N, D="head", z=True, bias=True, initial=True, dtype=torch.float32,
         device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    D_shape = {"head": (heads,), "channel": (heads, headdim), None: None}[D]
    t = dict(x=r(batch, L, heads, headdim), dt=r(batch, L, heads) * 0.5 - 1,
             A=-torch.rand(heads, generator=g, dtype=torch.float64) * 2 - 0.1,
             B=r(batch, L, groups, N), C=r(batch, L, groups, N) * 0.5,
             D=r(*D_shape) if D_shape else None, z=r(batch, L, heads, headdim) if z else None,
             dt_bias=r(heads) * 0.3 if bias else None,
             initial_states=r(batch, heads, headdim, N) if initial else None)
    return {k: None if v is None else v.to(device=device, dtype=dtype if k in LOW else torch.float32)
            for k, v in t.items()}


def run(fn, inputs, softplus, limit):
    if fn is ssd_scan_reference:
        return fn(**inputs, dt_softplus=softplus, dt_limit=limit)
    return fn(**inputs, chunk_size=16, dt_softplus=softplus, dt_limit=limit, return_final_states=True)


def references(inputs, softplus, limit):
    """float64 reference, and the reference on the same rounded inputs in the kernel's math dtype."""
    cpu = {k: None if v is None else v.detach().cpu() for k, v in inputs.items()}
    ref = run(ssd_scan_reference, {k: None if v is None else v.double() for k, v in cpu.items()}, softplus, limit)
    return ref, run(ssd_scan_reference, cpu, softplus, limit)


CASES = {
    "L=1": dict(batch=2, L=1, heads=4, headdim=3, groups=2, N=16),
    "L=77 groups=2": dict(batch=2, L=77, heads=4, headdim=5, groups=2, N=16),
    "L=70 one group, D per channel": dict(batch=1, L=70, heads=3, headdim=4, groups=1, N=8, D="channel"),
    "L=45 heads=groups, no D/z/bias/initial": dict(batch=2, L=45, heads=3, headdim=2, groups=3, N=4, D=None,
                                                   z=False, bias=False, initial=False),
    "L=300 N=128 (Mamba-2's dstate)": dict(batch=1, L=300, heads=2, headdim=4, groups=1, N=128),
    "L=0": dict(batch=2, L=0, heads=2, headdim=3, groups=1, N=4),
}
SETTINGS = {"softplus": (True, NO_LIMIT), "softplus + dt_limit": (True, (0.05, 0.8)), "raw dt": (False, NO_LIMIT)}


def positive_dt(inputs, softplus):
    if not softplus:   # a positive step, as a softplus would give; a negative one makes the state explode
        inputs["dt"] = inputs["dt"].abs()
    return inputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_forward_and_final_state_match_reference(case, dtype, device, setting):
    softplus, limit = SETTINGS[setting]
    inputs = positive_dt(make(**CASES[case], dtype=dtype, device=device), softplus)
    (ref_out, ref_state), (low_out, low_state) = references(inputs, softplus, limit)
    out, state = run(shammie.mamba_chunk_scan_combined, inputs, softplus, limit)
    assert_matches_reference(out, ref_out, low_out, "out")
    assert_matches_reference(state, ref_state, low_state.to(state.dtype), "final state")


def leaves_of(inputs):
    return {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}


def loss_gradients(out, state, leaves, seed):
    """Gradients of a random linear function of (out, final state) w.r.t. each leaf."""
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    w_state = torch.randn(state.shape, generator=g, dtype=torch.float64).to(state.device, state.dtype)
    loss = (out.to(state.dtype) * w_out.to(state.dtype)).sum() + (state * w_state).sum()
    return list(torch.autograd.grad(loss, list(leaves.values())))


def gradients(fn, inputs, softplus, limit, seed=1):
    """{input name: gradient} of a random linear function of (out, final state)."""
    leaves = leaves_of(inputs)
    out, state = run(fn, {**inputs, **leaves}, softplus, limit)
    return dict(zip(leaves, loss_gradients(out, state, leaves, seed)))


def scan_and_gradients(inputs, seed=1, **kwargs):
    """[out, final state, then each input's gradient] of shammie's scan with softplus, chunk_size 64 and
    kwargs (seq_idx, ...)."""
    leaves = leaves_of(inputs)
    out, state = shammie.mamba_chunk_scan_combined(**leaves, chunk_size=64, dt_softplus=True,
                                                   return_final_states=True, **kwargs)
    return [out, state, *loss_gradients(out, state, leaves, seed)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["L=1", "L=77 groups=2", "L=70 one group, D per channel",
                                  "L=45 heads=groups, no D/z/bias/initial", "L=300 N=128 (Mamba-2's dstate)"])
@pytest.mark.parametrize("setting", ["softplus", "softplus + dt_limit"])
def test_gradients_match_reference(case, dtype, device, setting):
    softplus, limit = SETTINGS[setting]
    inputs = make(**CASES[case], dtype=dtype, device=device)
    got = gradients(shammie.mamba_chunk_scan_combined, inputs, softplus, limit)
    cpu = {k: None if v is None else v.detach().cpu() for k, v in inputs.items()}
    ref = gradients(ssd_scan_reference, {k: None if v is None else v.double() for k, v in cpu.items()}, softplus, limit)
    low = gradients(ssd_scan_reference, cpu, softplus, limit)
    for name in got:
        assert_matches_reference(got[name], ref[name], low[name], f"grad {name}")


def packed_seq_idx(seqlen, layout="runs"):
    """"runs": row 0 has runs of 1, 2, 130 (across a checkpoint interval) and the rest, row 1 one run;
    ids as mamba_ssm makes them (non-decreasing, int32). "chunk edges": sequences that start on the
    chunked implementation's chunk edges (steps 63, 64, 128, 191; row 1 at 64) with ids that come back
    (0, 1, 0, 1, 2) or go down: a change of id is what starts a sequence."""
    if layout == "runs":
        row0 = torch.repeat_interleave(torch.arange(4), torch.tensor([1, 2, 130, seqlen - 133]))
        return torch.stack([row0, torch.full((seqlen,), 5)]).to(torch.int32)
    row0 = torch.repeat_interleave(torch.tensor([0, 1, 0, 1, 2]), torch.tensor([63, 1, 64, 63, seqlen - 191]))
    row1 = torch.repeat_interleave(torch.tensor([7, 3]), torch.tensor([64, seqlen - 64]))
    return torch.stack([row0, row1]).to(torch.int32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("setting", ["softplus", "softplus + dt_limit"])
@pytest.mark.parametrize("layout", ["runs", "chunk edges"])
def test_packed_sequences_match_separate_runs(dtype, device, setting, layout):
    softplus, limit = SETTINGS[setting]
    inputs = make(batch=2, L=300, heads=4, headdim=3, groups=2, N=16, dtype=dtype, device=device)
    seq_idx = packed_seq_idx(300, layout).to(device)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    out, state = shammie.mamba_chunk_scan_combined(**leaves, chunk_size=64, seq_idx=seq_idx, dt_softplus=softplus,
                                                   dt_limit=limit, return_final_states=True)
    g = torch.Generator().manual_seed(1)
    w_out, w_state = torch.randn(out.shape, generator=g), torch.randn(state.shape, generator=g)
    loss = lambda o, s: (o.double() * w_out.double()).sum() + (s.double() * w_state.double()).sum()
    got = dict(zip(leaves, torch.autograd.grad(loss(out.cpu(), state.cpu()), list(leaves.values()))))

    def reference(compute_dtype):
        ref_leaves = {k: (v.detach().cpu().double() if compute_dtype == torch.float64 else v.detach().cpu())
                      .requires_grad_(True) for k, v in inputs.items() if v is not None}
        o, s = ssd_scan_packed_reference(**ref_leaves, dt_softplus=softplus, dt_limit=limit, seq_idx=seq_idx.cpu())
        grads = torch.autograd.grad(loss(o, s), list(ref_leaves.values()))
        return o.detach(), s.detach(), dict(zip(ref_leaves, grads))

    ref_out, ref_state, ref_grads = reference(torch.float64)
    low_out, low_state, low_grads = reference(None)
    assert_matches_reference(out, ref_out, low_out, "out")
    assert_matches_reference(state, ref_state, low_state.to(state.dtype), "final state")
    for name in got:
        assert_matches_reference(got[name], ref_grads[name], low_grads[name].to(got[name].dtype), f"grad {name}")


CU_SEQLENS = [0, 1, 3, 133, 133, 300]   # runs of 1, 2, 130 (across a checkpoint interval), an empty one, 167


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ids", ["cu_seqlens alone", "with seq_idx"])
def test_varlen_states_match_separate_runs(dtype, device, ids):
    """Each sequence's final state, and gradients through it, against scanning each on its own."""
    softplus, limit = SETTINGS["softplus"]
    inputs = make(batch=1, L=300, heads=4, headdim=3, groups=2, N=16, dtype=dtype, device=device)
    cu_seqlens = torch.tensor(CU_SEQLENS, dtype=torch.int32, device=device)
    seq_idx = None
    if ids == "with seq_idx":   # any ids that change where a sequence starts
        seq_idx = (7 * torch.repeat_interleave(torch.arange(5), torch.tensor([1, 2, 130, 0, 167]))[None]).to(device)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    out, state, varlen = shammie.mamba_chunk_scan_combined(
        **leaves, chunk_size=64, seq_idx=seq_idx, cu_seqlens=cu_seqlens, dt_softplus=softplus, dt_limit=limit,
        return_final_states=True, return_varlen_states=True)
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (out, state, varlen)]
    loss = lambda *ts: sum((t.double() * wt).sum() for t, wt in zip(ts, w))
    got = dict(zip(leaves, torch.autograd.grad(loss(out.cpu(), state.cpu(), varlen.cpu()), list(leaves.values()))))

    def reference(compute_dtype):
        ref_leaves = {k: (v.detach().cpu().double() if compute_dtype == torch.float64 else v.detach().cpu())
                      .requires_grad_(True) for k, v in inputs.items() if v is not None}
        results = ssd_scan_varlen_reference(**ref_leaves, dt_softplus=softplus, dt_limit=limit,
                                            cu_seqlens=cu_seqlens.cpu())
        grads = torch.autograd.grad(loss(*results), list(ref_leaves.values()))
        return [r.detach() for r in results], dict(zip(ref_leaves, grads))

    (ref_out, ref_state, ref_varlen), ref_grads = reference(torch.float64)
    (low_out, low_state, low_varlen), low_grads = reference(None)
    assert_matches_reference(out, ref_out, low_out, "out")
    assert_matches_reference(state, ref_state, low_state.to(state.dtype), "final state")
    assert_matches_reference(varlen, ref_varlen, low_varlen.to(varlen.dtype), "varlen states")
    assert torch.equal(varlen[3].cpu(), torch.zeros_like(varlen[3].cpu())), "an empty sequence's state is zero"
    for name in got:
        assert_matches_reference(got[name], ref_grads[name], low_grads[name].to(got[name].dtype), f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_states_opcheck_and_compile(device):
    inputs = make(batch=1, L=77, heads=4, headdim=5, groups=2, N=16, device=device)
    cu_seqlens = torch.tensor([0, 30, 31, 77], device=device)
    torch.library.opcheck(torch.ops.shammie.ssd_scan, (*(inputs[k] for k in OP_ORDER), True, None, cu_seqlens))
    leaves = [v.requires_grad_(True) for v in inputs.values()]

    def step(*args):
        out, varlen = shammie.mamba_chunk_scan_combined(**dict(zip(inputs, args)), chunk_size=16, dt_softplus=True,
                                                        cu_seqlens=cu_seqlens, return_varlen_states=True)
        return out.square().sum() + varlen.sum()

    assert_compiled_matches_eager(step, leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_sequences_opcheck(device):
    inputs = make(**CASES["L=77 groups=2"], device=device)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor([30, 1, 46])).expand(2, 77).to(device)
    torch.library.opcheck(torch.ops.shammie.ssd_scan, (*(inputs[k] for k in OP_ORDER), True, seq_idx))


def test_activations_of_mixed_dtypes_compute_in_the_widest():
    """mamba_ssm lets dt (and B, C) be float32 beside a bfloat16 x: nothing is rounded to x's dtype but
    the output."""
    inputs = make(**CASES["L=77 groups=2"], dtype=torch.float32)
    mixed = {**inputs, "x": inputs["x"].bfloat16()}
    widened = {**inputs, "x": mixed["x"].float()}
    out, state = run(shammie.mamba_chunk_scan_combined, mixed, True, NO_LIMIT)
    want_out, want_state = run(shammie.mamba_chunk_scan_combined, widened, True, NO_LIMIT)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want_out.bfloat16())
    torch.testing.assert_close(state, want_state)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    inputs = make(batch=1, L=40, heads=2, headdim=2, groups=1, N=3, D="channel", dtype=torch.float64, device=device)
    names = [k for k, v in inputs.items() if v is not None]

    def fn(*args):
        return run(shammie.mamba_chunk_scan_combined, dict(zip(names, args)), True, (0.05, 2.0))

    args = tuple(inputs[k].double().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_and_forward_mode_ad_are_clear_errors(device):
    inputs = make(batch=1, L=20, heads=2, headdim=2, groups=1, N=3, dtype=torch.float64, device=device)
    names = [k for k, v in inputs.items() if v is not None]
    fn = lambda *args: run(shammie.mamba_chunk_scan_combined, dict(zip(names, args)), True, (0.0, float("inf")))
    assert_differentiable_once(fn, [inputs[k].double().requires_grad_() for k in names], "ssd_scan")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_transforms(device):
    """grad, per-sample gradients and jacrev (shammie/_functorch.py); dt, B, C and z come from x, so
    that each batch row is one example."""
    inputs = make(batch=3, L=20, heads=2, headdim=3, groups=2, N=3, D="channel", dtype=torch.float64, device=device)
    fn = lambda x, A, D, dt_bias: shammie.mamba_chunk_scan_combined(
        x, x.mean(-1) - 1, A, 0.5 * x, x.flip(-1), 16, D=D, z=0.3 * x, dt_bias=dt_bias, dt_softplus=True)
    assert_torch_func_transforms(fn, [inputs[k].double() for k in ("x", "A", "D", "dt_bias")], "ssd_scan")


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_folds_the_activations_into_the_batch(device):
    """vmap over x, dt, B, C, z, initial_states and seq_idx is one call with the vmapped dim folded into
    the batch; vmap over A, or with packed sequences given by cu_seqlens, runs once per element."""
    t = make(batch=2, L=40, heads=4, headdim=3, groups=2, N=8, device=device)
    three = lambda x: torch.stack([x, 0.5 * x, -x])
    seq_idx = (torch.arange(40, device=device) >= torch.tensor([[9], [30]], device=device)).int()
    scan = lambda x, A, B, initial, seq_idx: shammie.mamba_chunk_scan_combined(
        x, t["dt"], A, B, t["C"], 16, D=t["D"], z=t["z"], dt_bias=t["dt_bias"], initial_states=initial,
        seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
    args = [three(t["x"]), t["A"], three(t["B"]), three(t["initial_states"]), torch.stack([seq_idx, 1 - seq_idx, seq_idx])]
    assert_vmap_rule("ssd_scan", scan, args, (0, None, 0, 0, 0), folds=True)
    assert_vmap_rule("ssd_scan", scan, [args[0], t["A"], t["B"], t["initial_states"], seq_idx], (0, None, None, None, None),
                     folds=True)
    assert_vmap_rule("ssd_scan", scan, [t["x"], three(t["A"]), t["B"], t["initial_states"], seq_idx],
                     (None, 0, None, None, None), folds=False)
    one = make(batch=1, L=40, heads=4, headdim=3, groups=2, N=8, device=device)
    packed = lambda x: shammie.mamba_chunk_scan_combined(
        x, one["dt"], one["A"], one["B"], one["C"], 16, dt_softplus=True,
        cu_seqlens=torch.tensor([0, 9, 40], device=device), return_varlen_states=True)
    assert_vmap_rule("ssd_scan", packed, [three(one["x"])], (0,), folds=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packing", ["initial and final states, dt_limit", "seq_idx", "cu_seqlens, varlen states"])
def test_torch_func_grad_through_states_and_packed_sequences(packing, device):
    """torch.func.grad equals autograd with every output in the loss: the final state, and each packed
    sequence's state."""
    batch = 1 if packing.startswith("cu_seqlens") else 2
    inputs = make(batch=batch, L=150, heads=4, headdim=3, groups=2, N=8, dtype=torch.float64, device=device)
    names = [k for k, v in inputs.items() if v is not None]
    args = [inputs[k].double() for k in names]
    options = dict(dt_softplus=True, return_final_states=True)
    if packing == "initial and final states, dt_limit":
        options["dt_limit"] = (0.05, 0.8)
    elif packing == "seq_idx":
        options["seq_idx"] = packed_seq_idx(150).to(device)
    else:
        options.update(cu_seqlens=torch.tensor([0, 1, 70, 70, 150], device=device), return_varlen_states=True)
    weights = torch.Generator().manual_seed(4)

    def loss(*args):
        outputs = shammie.mamba_chunk_scan_combined(**dict(zip(names, args)), chunk_size=64, **options)
        return sum((t * torch.randn(t.shape, generator=weights.manual_seed(i), dtype=t.dtype).to(device)).sum()
                   for i, t in enumerate(outputs))

    leaves = [t.clone().requires_grad_() for t in args]
    want = torch.autograd.grad(loss(*leaves), leaves)
    for name, got, expected in zip(names, torch.func.grad(loss, argnums=tuple(range(len(args))))(*args), want):
        torch.testing.assert_close(got, expected, msg=lambda m: f"grad {name}: {m}")


def test_gradcheck_across_chunks_and_packed_sequences():
    """Three of the chunked implementation's chunks, with sequences starting at a chunk's first step and
    inside one (float64, CPU)."""
    inputs = make(batch=1, L=150, heads=2, headdim=2, groups=1, N=3, dtype=torch.float64)
    seq_idx = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([64, 36, 50])).view(1, -1)
    names = [k for k, v in inputs.items() if v is not None]

    def fn(*args):
        return shammie.mamba_chunk_scan_combined(**dict(zip(names, args)), chunk_size=64, seq_idx=seq_idx,
                                                 dt_softplus=True, return_final_states=True)

    args = tuple(inputs[k].double().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("seed", range(10))
def test_chunked_form_equals_the_kernels_on_random_layouts(seed, monkeypatch):
    """Random sizes around the chunk (L = 63, 64, 65, 128, 129, ...), groups, optional D / z / dt_bias /
    initial states and random packed sequences: outputs, states and every gradient of the chunked
    form against the recurrence kernels in float64."""
    g = torch.Generator().manual_seed(100 + seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]
    groups = pick([1, 2])
    shape = dict(batch=pick([1, 2, 3]), L=pick([63, 64, 65, 127, 128, 129, 200]), heads=groups * pick([1, 2, 3]),
                 headdim=pick([1, 4]), groups=groups, N=pick([1, 5, 16]), D=pick(["head", "channel", None]),
                 z=pick([True, False]), bias=pick([True, False]), initial=pick([True, False]))
    inputs = {k: None if v is None else v.double() for k, v in make(**shape, seed=seed).items()}
    batch, L = shape["batch"], shape["L"]
    starts = torch.rand(batch, L, generator=g) < pick([0.0, 0.02, 0.2])
    seq_idx = starts.long().cumsum(1) * pick([1, -1]) if starts.any() else None

    def everything(impl):
        monkeypatch.setenv("SHAMMIE_SSD_IMPL", impl)
        return scan_and_gradients(inputs, seed, seq_idx=seq_idx)

    for got, expected in zip(everything("chunked"), everything("kernel")):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("forward_impl,backward_impl", [("kernel", "chunked"), ("chunked", "kernel")])
def test_either_backward_follows_either_forward(forward_impl, backward_impl, monkeypatch):
    """The forwards write the same checkpoints, so the backward ops of both implementations accept them."""
    inputs = make(batch=2, L=300, heads=4, headdim=3, groups=2, N=16, dtype=torch.float64)
    ops = [None if inputs[k] is None else inputs[k].double() for k in OP_ORDER]
    monkeypatch.setenv("SHAMMIE_SSD_IMPL", forward_impl)
    out, checkpoints, final, _ = torch.ops.shammie.ssd_scan(*ops, True)
    monkeypatch.setenv("SHAMMIE_SSD_IMPL", "kernel")
    _, kernel_checkpoints, kernel_final, _ = torch.ops.shammie.ssd_scan(*ops, True)
    torch.testing.assert_close(checkpoints, kernel_checkpoints, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, kernel_final, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(2)
    grad_out, grad_final = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(final.shape, generator=g)
    monkeypatch.setenv("SHAMMIE_SSD_IMPL", backward_impl)
    mixed = torch.ops.shammie.ssd_scan_backward(grad_out, grad_final.to(final.dtype), *ops, checkpoints, True)
    monkeypatch.setenv("SHAMMIE_SSD_IMPL", forward_impl)
    same = torch.ops.shammie.ssd_scan_backward(grad_out, grad_final.to(final.dtype), *ops, checkpoints, True)
    for got, expected in zip(mixed, same):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_chunked_form_in_batch_slices_equals_one_pass(monkeypatch):
    """SHAMMIE_SSD_CHUNKED_MB caps the chunked form's temporaries by running batch rows in slices:
    here 1 MiB, one row per slice (a row's (L, heads, 64) float64 temporary takes 640 KiB); the
    per-head gradients (dA, dD, dt_bias) add up across slices."""
    monkeypatch.setenv("SHAMMIE_SSD_IMPL", "chunked")
    inputs = {k: None if v is None else v.double()
              for k, v in make(batch=5, L=300, heads=4, headdim=3, groups=2, N=16).items()}
    seq_idx = torch.cat([packed_seq_idx(300, "chunk edges"), packed_seq_idx(300)[:1].repeat(3, 1)])
    outputs_and_grads = lambda: scan_and_gradients(inputs, 3, seq_idx=seq_idx)
    whole = outputs_and_grads()
    monkeypatch.setenv("SHAMMIE_SSD_CHUNKED_MB", "1")
    for got, expected in zip(outputs_and_grads(), whole):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("SHAMMIE_SSD_CHUNKED_MB", "lots")
    with pytest.raises(ValueError, match="SHAMMIE_SSD_CHUNKED_MB must be a positive integer"):
        outputs_and_grads()


@pytest.fixture
def deterministic_mode():
    # warn_only: cuBLAS (the chunked form's GEMMs) would otherwise ask for CUBLAS_WORKSPACE_CONFIG; the
    # alert of an op without a deterministic implementation is then a warning, which the test turns
    # into an error.
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_deterministic_mode_takes_the_chunked_form(deterministic_mode, monkeypatch):
    """Under torch.use_deterministic_algorithms, auto avoids the CUDA kernels' atomics: two backward
    passes agree bit for bit; SHAMMIE_SSD_IMPL=kernel raises torch's alert instead."""
    inputs = make(batch=2, L=300, heads=8, headdim=64, groups=1, N=128, device="cuda")
    monkeypatch.delenv("SHAMMIE_SSD_IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*shammie.*")
        first, second = scan_and_gradients(inputs), scan_and_gradients(inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    monkeypatch.setenv("SHAMMIE_SSD_IMPL", "kernel")
    with pytest.warns(UserWarning, match="ssd_scan_backward with SHAMMIE_SSD_IMPL=kernel"):
        scan_and_gradients(inputs)


def test_unknown_implementation_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SHAMMIE_SSD_IMPL", "fast")
    inputs = make(batch=1, L=5, heads=2, headdim=2, groups=1, N=3)
    with pytest.raises(ValueError, match="SHAMMIE_SSD_IMPL must be one of auto, kernel, chunked; got 'fast'"):
        run(shammie.mamba_chunk_scan_combined, inputs, True, NO_LIMIT)


OP_ORDER = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["L=77 groups=2", "L=45 heads=groups, no D/z/bias/initial"])
def test_opcheck(case, device):
    inputs = make(**CASES[case], device=device)
    torch.library.opcheck(torch.ops.shammie.ssd_scan, (*(inputs[k] for k in OP_ORDER), True))


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_cpu_instruction_set_copy(isa, monkeypatch):
    monkeypatch.setenv("SHAMMIE_CPU_ISA", isa)
    inputs = make(**CASES["L=300 N=128 (Mamba-2's dstate)"])
    (ref_out, _), (low_out, _) = references(inputs, True, NO_LIMIT)
    out, _ = run(shammie.mamba_chunk_scan_combined, inputs, True, NO_LIMIT)
    assert_matches_reference(out, ref_out, low_out, f"out [{isa}]")
    got = gradients(shammie.mamba_chunk_scan_combined, inputs, True, NO_LIMIT)
    ref = gradients(ssd_scan_reference, {k: None if v is None else v.double() for k, v in inputs.items()}, True,
                    NO_LIMIT)
    low = gradients(ssd_scan_reference, inputs, True, NO_LIMIT)
    for name in got:
        assert_matches_reference(got[name], ref[name], low[name], f"grad {name} [{isa}]")


def test_backward_is_deterministic_across_thread_counts():
    """dB and dC sum over the heads of a group, which run as separate work items."""
    inputs = make(batch=3, L=150, heads=8, headdim=4, groups=2, N=16)
    threads = torch.get_num_threads()
    try:
        runs = []
        for count in (1, 2, 3, 1, 2):
            torch.set_num_threads(count)
            runs.append(gradients(shammie.mamba_chunk_scan_combined, inputs, True, NO_LIMIT))
    finally:
        torch.set_num_threads(threads)
    for again in runs[1:]:
        for name in runs[0]:
            assert torch.equal(runs[0][name], again[name]), f"grad {name} depends on the thread count"


def test_non_contiguous_inputs():
    inputs = make(**CASES["L=77 groups=2"])
    strided = {k: None if v is None else v.transpose(0, -1).contiguous().transpose(0, -1) for k, v in inputs.items()}
    assert not strided["x"].is_contiguous()
    want = run(shammie.mamba_chunk_scan_combined, inputs, True, NO_LIMIT)
    got = run(shammie.mamba_chunk_scan_combined, strided, True, NO_LIMIT)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    inputs = make(**CASES["L=77 groups=2"], device=device)
    leaves = [v.requires_grad_(True) for v in inputs.values()]

    def step(*args):
        out, state = run(shammie.mamba_chunk_scan_combined, dict(zip(inputs, args)), True, (0.05, 0.8))
        return out.square().sum() + state.sum()

    assert_compiled_matches_eager(step, leaves)


def with_change(change):
    inputs = make(**CASES["L=77 groups=2"])
    kwargs = {}
    if change == "x 3-D":
        inputs["x"] = inputs["x"][..., 0]
    elif change == "dt wrong heads":
        inputs["dt"] = inputs["dt"][..., :3]
    elif change == "A per channel":
        inputs["A"] = torch.zeros(4, 5)
    elif change == "heads not a multiple of groups":
        inputs["B"] = inputs["B"].repeat(1, 1, 2, 1)[:, :, :3]
        inputs["C"] = inputs["C"].repeat(1, 1, 2, 1)[:, :, :3]
    elif change == "C's dstate differs":
        inputs["C"] = inputs["C"][..., :8]
    elif change == "D wrong shape":
        inputs["D"] = torch.zeros(5)
    elif change == "initial_states wrong shape":
        inputs["initial_states"] = inputs["initial_states"][..., :4]
    elif change == "integer x":
        inputs["x"] = inputs["x"].long()
    elif change == "complex A":
        inputs["A"] = inputs["A"].to(torch.complex64)
    elif change == "dstate 257":
        inputs["B"] = torch.zeros(2, 77, 2, 257)
        inputs["C"] = torch.zeros(2, 77, 2, 257)
        inputs["initial_states"] = None
    elif change == "dt_limit reversed":
        kwargs["dt_limit"] = (1.0, 0.5)
    elif change == "chunk_size 0":
        kwargs["chunk_size"] = 0
    elif change == "seq_idx wrong shape":
        kwargs["seq_idx"] = torch.zeros(2, 76, dtype=torch.int32)
    elif change == "seq_idx float":
        kwargs["seq_idx"] = torch.zeros(2, 77)
    elif change == "return_varlen_states without cu_seqlens":
        kwargs["return_varlen_states"] = True
    elif change == "cu_seqlens with batch 2":
        kwargs["cu_seqlens"] = torch.tensor([0, 77], dtype=torch.int32)
    elif change == "cu_seqlens float":
        kwargs["cu_seqlens"] = torch.tensor([0.0, 77.0])
    elif change == "cu_seqlens 2-D":
        kwargs["cu_seqlens"] = torch.tensor([[0, 77]])
    elif change.startswith("cu_seqlens"):   # the value checks, at batch 1
        inputs = {k: v[:1] if k in ("x", "dt", "B", "C", "z", "initial_states") else v for k, v in inputs.items()}
        kwargs["cu_seqlens"], kwargs["seq_idx"] = {
            "cu_seqlens not from 0": ([1, 77], None),
            "cu_seqlens not to seqlen": ([0, 30, 76], None),
            "cu_seqlens decreasing": ([0, 40, 30, 77], None),
            "cu_seqlens empty first sequence with initial states": ([0, 0, 77], None),
            "cu_seqlens and seq_idx disagree": ([0, 30, 77], [0] * 31 + [1] * 46),
            "cu_seqlens and seq_idx disagree (extra start)": ([0, 77], [0] * 10 + [1] * 67),
        }[change]
        kwargs["cu_seqlens"] = torch.tensor(kwargs["cu_seqlens"])
        if kwargs["seq_idx"] is not None:
            kwargs["seq_idx"] = torch.tensor([kwargs["seq_idx"]], dtype=torch.int32)
    elif change == "x on meta":
        inputs["x"] = inputs["x"].to("meta")
    return inputs, kwargs


@pytest.mark.parametrize("change,error,message", [
    ("x 3-D", ValueError, r"x must be \(batch, seqlen, nheads, headdim\)"),
    ("dt wrong heads", ValueError, r"dt must have shape \(2, 77, 4\)"),
    ("A per channel", ValueError, r"A must have shape \(4,\)"),
    ("heads not a multiple of groups", ValueError, r"nheads \(4\) must be a multiple of ngroups \(3\)"),
    ("C's dstate differs", ValueError, r"C must have shape \(2, 77, 2, 16\)"),
    ("D wrong shape", ValueError, r"D must have shape \(4,\) or \(4, 5\)"),
    ("initial_states wrong shape", ValueError, r"initial_states must have shape \(2, 4, 5, 16\)"),
    ("integer x", TypeError, "x must be a real floating-point tensor"),
    ("complex A", TypeError, "A must be a real floating-point tensor"),
    ("dstate 257", ValueError, "dstate <= 256"),
    ("dt_limit reversed", ValueError, r"dt_limit must be \(low, high\) with low <= high"),
    ("chunk_size 0", ValueError, "chunk_size must be a positive int"),
    ("seq_idx wrong shape", ValueError, r"seq_idx must have shape \(batch, seqlen\) = \(2, 77\)"),
    ("seq_idx float", TypeError, "seq_idx must be int32 or int64"),
    ("return_varlen_states without cu_seqlens", ValueError, "return_varlen_states needs cu_seqlens"),
    ("cu_seqlens with batch 2", ValueError, "cu_seqlens needs batch 1"),
    ("cu_seqlens float", TypeError, "cu_seqlens must be int32 or int64"),
    ("cu_seqlens 2-D", ValueError, r"cu_seqlens must have shape \(num_seqs \+ 1,\)"),
    ("cu_seqlens not from 0", ValueError, r"cu_seqlens must run from 0 to seqlen \(77\), got 1 \.\. 77"),
    ("cu_seqlens not to seqlen", ValueError, r"cu_seqlens must run from 0 to seqlen \(77\), got 0 \.\. 76"),
    ("cu_seqlens decreasing", ValueError, r"non-decreasing, got cu_seqlens\[1\] = 40 > cu_seqlens\[2\] = 30"),
    ("cu_seqlens empty first sequence with initial states", ValueError, "the first sequence must not be empty"),
    ("cu_seqlens and seq_idx disagree", ValueError, "disagree at step 30: seq_idx does not start a sequence"),
    ("cu_seqlens and seq_idx disagree (extra start)", ValueError, "disagree at step 10: seq_idx starts a sequence"),
    ("x on meta", ValueError, r"must be on the same device as x \(meta\)"),
])
def test_bad_input_is_a_clear_error(change, error, message):
    inputs, kwargs = with_change(change)
    kwargs = {"chunk_size": 16, **kwargs}
    with pytest.raises(error, match=message):
        shammie.mamba_chunk_scan_combined(**inputs, dt_softplus=True, **kwargs)


# ---- mamba_split_conv1d_scan_combined: the Mamba-2 mixer after its in-projection ------------------

def split_reference(zxbcdt, weight, bias, dt_bias, A, D, headdim, ngroups, rms_weight, eps, out_w, out_b,
                    norm_before_gate, initial_states, dt_limit):
    """The mixer written from the references in float64: conv, sequential scan, grouped gated RMSNorm, the
    gated MLP's channels (mamba_ssm's d_nonssm) ahead, GEMM."""
    from shammie.reference.causal_conv1d import causal_conv1d_reference

    heads = A.shape[0]
    dim = heads * headdim
    dstate = (weight.shape[0] - dim) // (2 * ngroups)
    nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - heads) // 2
    z0, x0, z, xBC, dt = zxbcdt.split([nonssm, nonssm, dim, dim + 2 * ngroups * dstate, heads], dim=-1)
    xBC = causal_conv1d_reference(xBC.transpose(1, 2), weight, bias, activation="silu").transpose(1, 2)
    x, B, C = xBC.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    y, state = ssd_scan_reference(x.unflatten(-1, (heads, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)),
                                  C.unflatten(-1, (ngroups, dstate)), D, None if rms_weight is not None else
                                  z.unflatten(-1, (heads, headdim)), dt_bias, initial_states, True, dt_limit)
    y = y.flatten(-2)
    if rms_weight is not None:
        gate = torch.nn.functional.silu(z)
        y = y if norm_before_gate else y * gate
        g = y.unflatten(-1, (ngroups, dim // ngroups))
        y = (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * rms_weight
        y = y * gate if norm_before_gate else y
    y = torch.cat([z0 * torch.sigmoid(z0) * x0, y], dim=-1)
    if out_w is not None:
        y = y @ out_w.T + (out_b if out_b is not None else 0)
    return y, state


SPLIT_CASES = {
    "norm after gate (HF), groups 2, out-proj": dict(ngroups=2, norm=True, before=False, proj=True, D="head"),
    "norm before gate, one group": dict(ngroups=1, norm=True, before=True, proj=True, D="channel"),
    "z in the scan, no norm, no proj, initial state, dt_limit": dict(ngroups=2, norm=False, before=True, proj=False,
                                                                    D="head", initial=True, limit=(0.05, 1.0)),
    "gated MLP channels (d_nonssm = 5), norm, out-proj": dict(ngroups=2, norm=True, before=False, proj=True,
                                                              D="head", nonssm=5),
    "gated MLP channels (d_nonssm = 3), z in the scan, no proj": dict(ngroups=1, norm=False, before=True, proj=False,
                                                                      D="channel", nonssm=3, initial=True),
}


def split_inputs(ngroups, norm, before, proj, D, initial=False, limit=NO_LIMIT, nonssm=0, batch=2, L=40, heads=4,
                 headdim=3, dstate=8, width=4, out_dim=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    dim = heads * headdim
    conv_dim = dim + 2 * ngroups * dstate
    return dict(zxbcdt=r(batch, L, 2 * nonssm + 2 * dim + 2 * ngroups * dstate + heads),
                conv1d_weight=r(conv_dim, width) * 0.5,
                conv1d_bias=r(conv_dim), dt_bias=r(heads) * 0.3,
                A=-torch.rand(heads, generator=g, dtype=torch.float64).to(dtype) - 0.2,
                D=r(heads) if D == "head" else r(heads, headdim), headdim=headdim, ngroups=ngroups,
                rmsnorm_weight=r(dim) if norm else None, outproj_weight=r(out_dim, nonssm + dim) if proj else None,
                outproj_bias=r(out_dim) if proj else None, norm_before_gate=before,
                initial_states=r(batch, heads, headdim, dstate) if initial else None, dt_limit=limit)


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_conv1d_scan_matches_reference(case):
    inputs = split_inputs(**SPLIT_CASES[case])
    out, state = shammie.mamba_split_conv1d_scan_combined(**inputs, chunk_size=16, rmsnorm_eps=1e-5,
                                                          return_final_states=True)
    ref_out, ref_state = split_reference(
        inputs["zxbcdt"], inputs["conv1d_weight"], inputs["conv1d_bias"], inputs["dt_bias"], inputs["A"],
        inputs["D"], inputs["headdim"], inputs["ngroups"], inputs["rmsnorm_weight"], 1e-5, inputs["outproj_weight"],
        inputs["outproj_bias"], inputs["norm_before_gate"], inputs["initial_states"], inputs["dt_limit"])
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, ref_state, rtol=1e-10, atol=1e-10)


def test_split_gated_mlp_channels_gradients_match_reference():
    """mamba_ssm's d_nonssm > 0 layout: zxbcdt = (z0, x0, z, xBC, dt), silu(z0)·x0 ahead of the mixer's
    output into the out-projection; gradients of the recomputing training path against the reference."""
    inputs = split_inputs(**SPLIT_CASES["gated MLP channels (d_nonssm = 5), norm, out-proj"], initial=True, L=20)
    names = ["zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D", "rmsnorm_weight", "outproj_weight",
             "outproj_bias", "initial_states"]
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in names}
    rest = {k: v for k, v in inputs.items() if k not in names}
    out, state = shammie.mamba_split_conv1d_scan_combined(**leaves, **rest, chunk_size=8, rmsnorm_eps=1e-5,
                                                          return_final_states=True)
    assert out.shape == (2, 20, 7)
    ref_out, ref_state = split_reference(
        *(leaves[k] for k in names[:6]), inputs["headdim"], inputs["ngroups"], leaves["rmsnorm_weight"], 1e-5,
        leaves["outproj_weight"], leaves["outproj_bias"], inputs["norm_before_gate"], leaves["initial_states"],
        inputs["dt_limit"])
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (out, state)]
    loss = lambda o, s: (o * weights[0]).sum() + (s * weights[1]).sum()
    got = torch.autograd.grad(loss(out, state), list(leaves.values()))
    want = torch.autograd.grad(loss(ref_out, ref_state), list(leaves.values()))
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


def test_split_conv1d_scan_gradcheck_and_float32():
    inputs = split_inputs(**SPLIT_CASES["norm after gate (HF), groups 2, out-proj"], L=20)
    names = ["zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D", "rmsnorm_weight", "outproj_weight"]
    rest = {k: v for k, v in inputs.items() if k not in names}

    def fn(*args):
        return shammie.mamba_split_conv1d_scan_combined(**dict(zip(names, args)), **rest, chunk_size=16)

    assert torch.autograd.gradcheck(fn, tuple(inputs[k].requires_grad_() for k in names), eps=1e-6, atol=1e-5)
    low = {k: v.detach().float() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    want = fn(*(inputs[k].detach() for k in names))
    got = shammie.mamba_split_conv1d_scan_combined(**low, chunk_size=16)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_split_conv1d_scan_packed_sequences_match_separate_runs():
    # Both the conv and the scan must see the boundaries: each packed sequence equals its own call
    # (from initial_states for a row's first sequence, from zeros after), gradients included.
    inputs = split_inputs(**SPLIT_CASES["norm after gate (HF), groups 2, out-proj"], initial=True)
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor([2, 25, 13])),
                           torch.full((40,), 3)]).to(torch.int32)
    zxbcdt = inputs.pop("zxbcdt").requires_grad_()
    initial = inputs.pop("initial_states")
    out, state = shammie.mamba_split_conv1d_scan_combined(zxbcdt, **inputs, initial_states=initial, seq_idx=seq_idx,
                                                          chunk_size=16, return_final_states=True)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (got_grad,) = torch.autograd.grad((out * grad).sum(), zxbcdt)
    want_grad = torch.zeros_like(zxbcdt)
    for b, runs in enumerate(([0, 2, 27, 40], [0, 40])):
        for start, end in zip(runs, runs[1:]):
            piece = zxbcdt.detach()[b : b + 1, start:end].clone().requires_grad_()
            o, s = shammie.mamba_split_conv1d_scan_combined(
                piece, **inputs, initial_states=initial[b : b + 1] if start == 0 else None, chunk_size=16,
                return_final_states=True)
            torch.testing.assert_close(out[b : b + 1, start:end], o, rtol=1e-10, atol=1e-10)
            (want_grad[b : b + 1, start:end],) = torch.autograd.grad((o * grad[b : b + 1, start:end]).sum(), piece)
        torch.testing.assert_close(state[b : b + 1], s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-9)


def split_training(inputs, seq_idx=None):
    """out, final state and the gradients of every float input, through the training path."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    rest = {k: v for k, v in inputs.items() if k not in leaves}
    out, state = shammie.mamba_split_conv1d_scan_combined(**leaves, **rest, seq_idx=seq_idx, chunk_size=16,
                                                          return_final_states=True)
    g = torch.Generator().manual_seed(9)
    loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum() + \
        (state.double() * torch.randn(state.shape, generator=g, dtype=torch.float64)).sum()
    return out.detach(), state.detach(), dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [*SPLIT_CASES, "packed sequences"])
def test_split_recomputing_training_path_equals_the_composition(case, dtype, monkeypatch):
    """Eager training runs one autograd Function that recomputes around the scan; under torch.compile
    the ops are composed. Same outputs and gradients (z in the scan or in the norm, dt_limit, initial
    states, packed sequences, final-state gradients)."""
    settings = SPLIT_CASES.get(case, dict(ngroups=2, norm=True, before=False, proj=True, D="head", initial=True))
    inputs = split_inputs(**settings, dtype=dtype)
    seq_idx = (torch.arange(40) >= 17).int().expand(2, 40) if case == "packed sequences" else None
    got = split_training(inputs, seq_idx)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)   # the composed path, in eager mode
    want = split_training(inputs, seq_idx)
    tolerance = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[0], want[0], **tolerance)
    torch.testing.assert_close(got[1], want[1], **tolerance)
    assert got[2].keys() == want[2].keys()
    for name in got[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **tolerance, msg=lambda m: f"grad {name}: {m}")


def test_split_training_path_keeps_what_mamba_ssm_keeps():
    """At least the conv output and the norm's float32 intermediates (4 (batch, L, dim) float32) less
    than the composition; here 9.7 -> 4.6 of those units at Mamba2-130M's widths."""
    inputs = split_inputs(ngroups=1, norm=True, before=False, proj=True, D="head", L=256, heads=8, headdim=16,
                          dstate=32, out_dim=64, dtype=torch.float32)
    leaves = {k: v.requires_grad_(True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    call = lambda: shammie.mamba_split_conv1d_scan_combined(**leaves, chunk_size=16)
    _, recomputing = saved_bytes(call)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        _, composed = saved_bytes(call)
    unit = 2 * 256 * 8 * 16 * 4
    assert composed - recomputing >= 4 * unit, f"composed keeps {composed / unit:.2f} units, Function {recomputing / unit:.2f}"


def test_split_conv1d_scan_bad_input():
    inputs = split_inputs(ngroups=2, norm=True, before=False, proj=True, D="head")
    with pytest.raises(ValueError, match="pass headdim when D is per head"):
        shammie.mamba_split_conv1d_scan_combined(**{**inputs, "headdim": None}, chunk_size=16)
    with pytest.raises(ValueError, match=r"zxbcdt's last dim \(59\) must be 2·d_nonssm \+ 2·dim \+ 2·ngroups·dstate "
                                         r"\+ nheads = 2·d_nonssm \+ 60"):
        shammie.mamba_split_conv1d_scan_combined(**{**inputs, "zxbcdt": inputs["zxbcdt"][..., :-1]}, chunk_size=16)
    with pytest.raises(ValueError, match=r"conv1d_weight must be \(dim \+ 2·ngroups·dstate, width\) .* dim = 12, "
                                         r"ngroups = 2 .* got \(43, 4\)"):
        shammie.mamba_split_conv1d_scan_combined(**{**inputs, "conv1d_weight": inputs["conv1d_weight"][:-1]},
                                                 chunk_size=16)
    # A conv weight 4 rows short reads as dstate 7 and d_nonssm 2: the out-projection's width tells.
    with pytest.raises(ValueError, match=r"outproj_weight must be \(out_dim, d_nonssm \+ dim\) = \(out_dim, 14\)"):
        shammie.mamba_split_conv1d_scan_combined(**{**inputs, "conv1d_weight": inputs["conv1d_weight"][:-4],
                                                    "conv1d_bias": inputs["conv1d_bias"][:-4]}, chunk_size=16)
    with pytest.raises(ValueError, match=r"nheads \(4\) must be a multiple of ngroups \(3\)"):
        shammie.mamba_split_conv1d_scan_combined(**{**inputs, "ngroups": 3}, chunk_size=16)
    with pytest.raises(ValueError, match=r"rmsnorm_weight must have shape \(12,\)"):
        shammie.mamba_split_conv1d_scan_combined(**{**inputs, "rmsnorm_weight": inputs["rmsnorm_weight"][:-1]},
                                                 chunk_size=16)


def test_split_training_under_autocast_with_float32_activations():
    """Falcon-H1 hands the mixer float32 zxbcdt inside bf16 autocast: the out-projection's GEMM runs in
    bf16, so its gradient arrives in bf16 while the recomputed norm is float32."""
    inputs = split_inputs(ngroups=2, norm=True, before=False, proj=True, D="head", dtype=torch.float32)
    leaves = {k: v.requires_grad_(True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    grads = {}
    for path in ("recomputing", "composed"):
        with pytest.MonkeyPatch.context() as patch:
            if path == "composed":
                patch.setattr(torch.compiler, "is_compiling", lambda: True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = shammie.mamba_split_conv1d_scan_combined(**leaves, chunk_size=16)
            assert out.dtype == torch.bfloat16
            grads[path] = torch.autograd.grad(out.float().sum(), [leaves["zxbcdt"], leaves["outproj_weight"]])
    for got, want in zip(grads["recomputing"], grads["composed"]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_recomputing_backwards_refuse_double_backward_and_forward_mode_ad():
    inputs = split_inputs(**SPLIT_CASES["norm after gate (HF), groups 2, out-proj"], L=20)
    names = ["zxbcdt", "conv1d_weight", "A", "outproj_weight"]
    rest = {k: v for k, v in inputs.items() if k not in names}
    fn = lambda *args: shammie.mamba_split_conv1d_scan_combined(**dict(zip(names, args)), **rest, chunk_size=16)
    assert_differentiable_once(fn, [inputs[k].requires_grad_() for k in names], "mamba_split_conv1d_scan_combined")


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_torch_func_transforms(case):
    """Under torch.func the mixer composes the conv and the scan, each transformable (shammie/_functorch.py):
    grad, per-sample gradients and jacrev equal autograd through the recomputing Function."""
    inputs = split_inputs(**{**SPLIT_CASES[case], "initial": False}, batch=3, L=20)   # per example: no batched state
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    rest = {k: v for k, v in inputs.items() if k not in names}
    fn = lambda *args: shammie.mamba_split_conv1d_scan_combined(**dict(zip(names, args)), **rest, chunk_size=16)
    assert_torch_func_transforms(fn, [inputs[k] for k in names], "(causal_conv1d|ssd_scan)")


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_output_can_be_modified_in_place(case):
    """Callers may add a residual in place, as with the composed ops."""
    inputs = split_inputs(**SPLIT_CASES[case])
    zxbcdt = inputs.pop("zxbcdt").requires_grad_(True)
    out = shammie.mamba_split_conv1d_scan_combined(zxbcdt, **inputs, chunk_size=16)
    out.add_(1.0)
    (grad,) = torch.autograd.grad(out.square().sum(), zxbcdt)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        composed = shammie.mamba_split_conv1d_scan_combined(zxbcdt, **inputs, chunk_size=16) + 1.0
    torch.testing.assert_close(out, composed)
    torch.testing.assert_close(grad, torch.autograd.grad(composed.square().sum(), zxbcdt)[0])
