"""selective_state_update: against a float64 reference written from the math, Mamba-1 and Mamba-2
layouts, N from 1 to 256, every dtype, float32 state under low-precision inputs, strided state;
opcheck, torch.compile (in-place state), and bad input."""

import pytest
import torch

import shammie
from shammie.reference.selective_scan import selective_state_update_reference
from conftest import DEVICES, DTYPES, assert_matches_reference, compile_fullgraph


def make(batch, dim, N, heads=None, groups=1, dtype=torch.float32, device="cpu", D=True, z=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    lead = (batch, heads, dim) if heads else (batch, dim)
    chan = (heads, dim) if heads else (dim,)
    bc = (batch, groups, N) if heads else (batch, N)
    t = dict(state=r(*lead, N), x=r(*lead), dt=r(*lead) * 0.5, A=-torch.rand(*chan, N, generator=g, dtype=torch.float64) * 2,
             B=r(*bc), C=r(*bc), D=r(*chan) if D else None, z=r(*lead) if z else None, dt_bias=r(*chan) * 0.1 if bias else None)
    low = {"state", "x", "dt", "B", "C", "z"}
    return {k: None if v is None else v.to(device=device, dtype=dtype if k in low else torch.float32) for k, v in t.items()}


def run_reference(inputs, softplus, dtype):
    """float64 reference, and the same math in float32 on the rounded inputs (the best a kernel can do)."""
    to = lambda d: {k: None if v is None else v.detach().cpu().to(d) for k, v in inputs.items()}
    ref = selective_state_update_reference(**to(torch.float64), dt_softplus=softplus)
    low = selective_state_update_reference(**to(torch.float32 if dtype != torch.float64 else torch.float64), dt_softplus=softplus)
    return ref, low


CASES = {
    "mamba1 N=16": dict(batch=2, dim=24, N=16),
    "mamba1 N=1": dict(batch=3, dim=5, N=1),
    "mamba1 N=4 no D/z/bias": dict(batch=2, dim=7, N=4, D=False, z=False, bias=False),
    "mamba1 N=64": dict(batch=1, dim=9, N=64),
    "mamba1 N=256": dict(batch=2, dim=3, N=256),
    "mamba2 heads=4 groups=2": dict(batch=2, dim=8, N=16, heads=4, groups=2),
    "mamba2 heads=3 groups=1": dict(batch=1, dim=5, N=32, heads=3, groups=1),
    "empty batch": dict(batch=0, dim=4, N=8),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("softplus", [False, True])
def test_matches_reference(case, dtype, device, softplus):
    inputs = make(**CASES[case], dtype=dtype, device=device)
    (ref_out, ref_state), (low_out, low_state) = run_reference(inputs, softplus, dtype)
    state = inputs["state"]
    out = shammie.selective_state_update(**inputs, dt_softplus=softplus)
    assert_matches_reference(out, ref_out, low_out.to(dtype), "out")
    assert_matches_reference(state, ref_state, low_state.to(dtype), "state")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_state_under_low_precision_inputs(dtype, device):
    inputs = make(2, 12, 16, dtype=dtype, device=device)
    inputs["state"] = inputs["state"].float()
    (ref_out, ref_state), (low_out, low_state) = run_reference(inputs, True, dtype)
    out = shammie.selective_state_update(**inputs, dt_softplus=True)
    assert out.dtype == dtype and inputs["state"].dtype == torch.float32
    assert_matches_reference(out, ref_out, low_out.to(dtype), "out")
    assert_matches_reference(inputs["state"], ref_state, low_state.float(), "state")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_state_in_a_cache(device):
    # The state is often a slice of a larger cache, e.g. one layer of (layers, batch, dim, N), or
    # stored (batch, N, dim) and transposed.
    inputs = make(2, 6, 8, dtype=torch.float64, device=device)
    cache = torch.zeros(3, 2, 8, 6, dtype=torch.float64, device=device)
    cache[1] = inputs["state"].transpose(1, 2)
    state = cache[1].transpose(1, 2)
    assert not state.is_contiguous()
    inputs["state"] = state
    (ref_out, ref_state), _ = run_reference(inputs, True, torch.float64)
    out = shammie.selective_state_update(**inputs, dt_softplus=True)
    torch.testing.assert_close(out, ref_out.to(device))
    torch.testing.assert_close(cache[1].transpose(1, 2), ref_state.to(device))
    assert cache[0].abs().sum() == 0 and cache[2].abs().sum() == 0


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_cpu_instruction_set_copy(isa, monkeypatch):
    monkeypatch.setenv("SHAMMIE_CPU_ISA", isa)
    inputs = make(2, 16, 16, heads=2, groups=1)
    (ref_out, ref_state), (low_out, low_state) = run_reference(inputs, True, torch.float32)
    out = shammie.selective_state_update(**inputs, dt_softplus=True)
    assert_matches_reference(out, ref_out, low_out, f"out [{isa}]")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    inputs = make(2, 8, 16, device=device)
    args = [inputs[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    torch.library.opcheck(torch.ops.shammie.selective_state_update, (*args, True))
    torch._dynamo.reset()
    state_eager = inputs["state"].clone()
    compiled_state = inputs["state"].clone()

    def step(state, x, dt, A, B, C, D, z, dt_bias):
        return shammie.selective_state_update(state, x * 1.5, dt, A, B, C, D, z, dt_bias, dt_softplus=True) + 1

    eager = step(state_eager, *args[1:])
    got = compile_fullgraph(step, device)(compiled_state, *args[1:])
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(compiled_state, state_eager)


@pytest.mark.parametrize("device", DEVICES)
def test_state_version_bumps_and_a_state_requiring_grad_is_refused(device):
    inputs = make(2, 8, 4, heads=2, device=device)
    state = inputs["state"]
    version = state._version
    shammie.selective_state_update(**inputs, dt_softplus=True)
    with torch.no_grad():
        shammie.selective_state_update(**inputs, dt_softplus=True)
    assert state._version == version + 2
    # A state autograd saved, updated through an alias (.detach() shares the version counter).
    leaf = state.clone().requires_grad_()
    saved = leaf.exp()
    with torch.no_grad():
        shammie.selective_state_update(**{**inputs, "state": saved.detach()}, dt_softplus=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="selective_state_update: state requires grad"):
        shammie.selective_state_update(**{**inputs, "state": leaf}, dt_softplus=True)
    assert torch.equal(leaf.detach(), before)
    out = shammie.selective_state_update(**{**inputs, "x": inputs["x"].clone().requires_grad_()})
    with pytest.raises(RuntimeError, match="derivative for shammie::selective_state_update is not implemented"):
        out.sum().backward()


def test_bad_input_is_a_clear_error():
    good = make(2, 8, 16)
    def call(**changes):
        return shammie.selective_state_update(**{**good, **changes}, dt_softplus=True)
    with pytest.raises(ValueError, match=r"state must be \(batch, dim, dstate\)"):
        call(state=good["state"][0])
    with pytest.raises(ValueError, match=r"x must have shape \(batch, dim\)"):
        call(x=good["x"][:, :3])
    with pytest.raises(ValueError, match=r"A must have shape \(dim, dstate\)"):
        call(A=good["A"][:, :4])
    with pytest.raises(ValueError, match=r"B must have shape \(batch, dstate\)"):
        call(B=good["B"][:, :4])
    with pytest.raises(TypeError, match="dt must have the same dtype as x"):
        call(dt=good["dt"].double())
    with pytest.raises(TypeError, match="state must have x's dtype"):
        call(state=good["state"].double())
    with pytest.raises(TypeError, match="complex A is not supported"):
        call(A=torch.complex(good["A"], good["A"]))
    with pytest.raises(ValueError, match="must be a multiple of B's ngroups"):
        m2 = make(1, 4, 8, heads=3, groups=1)
        shammie.selective_state_update(**{**m2, "B": torch.randn(1, 2, 8), "C": torch.randn(1, 2, 8)})
    with pytest.raises(ValueError, match="must be on the same device as x"):
        call(C=good["C"].to("meta"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["mamba1 N=16", "mamba2 heads=4 groups=2"])
def test_state_batch_indices_update_the_named_cache_rows(case, dtype, device):
    """Continuous batching: element b updates cache row indices[b]; −1 pads; other rows stay as they were."""
    inputs = make(**{**CASES[case], "batch": 3}, dtype=dtype, device=device)
    cache = make(**{**CASES[case], "batch": 6}, dtype=dtype, device=device, seed=5)["state"]
    rows = torch.tensor([4, -1, 1], device=device, dtype=torch.int32)
    inputs["state"] = cache[rows.long().clamp(min=0)].clone()       # what each element starts from
    (ref_out, ref_state), (low_out, low_state) = run_reference(inputs, True, dtype)
    before = cache.clone()
    out = shammie.selective_state_update(**{**inputs, "state": cache}, dt_softplus=True, state_batch_indices=rows)
    for b, row in enumerate(rows.tolist()):
        if row < 0:
            assert torch.equal(out[b].cpu(), torch.zeros_like(out[b].cpu())), "a padding element's out is zero"
            continue
        assert_matches_reference(out[b], ref_out[b], low_out[b].to(dtype), f"out {b}")
        assert_matches_reference(cache[row], ref_state[b], low_state[b].to(dtype), f"state row {row}")
    untouched = [r for r in range(6) if r not in rows.tolist()]
    assert torch.equal(cache[untouched], before[untouched]), "rows no element names must not change"


@pytest.mark.parametrize("device", DEVICES)
def test_state_batch_indices_opcheck_and_bad_input(device):
    inputs = make(2, 8, 16, device=device)
    cache = torch.randn(5, 8, 16, device=device)
    args = [inputs[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    torch.library.opcheck(torch.ops.shammie.selective_state_update,
                          (cache, *args, True, torch.tensor([3, 0], device=device)))
    call = lambda rows: shammie.selective_state_update(cache, *args, dt_softplus=True, state_batch_indices=rows)
    for rows, error, message in (
            ([3, 5], ValueError, r"state_batch_indices\[1\] = 5 is not a state row in \[0, 5\) or -1"),
            ([-2, 0], ValueError, r"state_batch_indices\[0\] = -2 is not a state row"),
            ([2, 2], ValueError, "names state row 2 twice"),
            ([1, 2, 3], ValueError, r"state_batch_indices must have shape \(batch,\) = \(2,\)"),
            ([0.0, 1.0], TypeError, "state_batch_indices must be int32 or int64")):
        with pytest.raises(error, match=message):
            call(torch.tensor(rows, device=device))
    call(torch.tensor([-1, -1], device=device))   # padding may repeat
