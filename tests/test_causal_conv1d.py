"""causal_conv1d_fn / causal_conv1d_update: against a float64 reference (HF's depthwise conv1d
formulation), on both devices, every dtype, widths 1-5, odd lengths, channel-last and sliced inputs;
gradcheck, opcheck, torch.compile, and bad input."""

import pytest
import torch

import shammie
from shammie.reference.causal_conv1d import (causal_conv1d_packed_reference, causal_conv1d_reference,
                                             causal_conv1d_update_reference)
from conftest import (DEVICES, DTYPES, assert_differentiable_once, assert_matches_reference,
                      assert_torch_func_transforms, assert_vmap_rule, compile_fullgraph)

# (batch, dim, seqlen, width); 1,100 steps span two of the CUDA backward's chunks (1,024 steps each).
SHAPES = [(2, 5, 1, 4), (2, 5, 7, 1), (1, 3, 129, 2), (3, 8, 151, 3), (2, 16, 372, 4), (1, 4, 33, 5), (0, 4, 9, 4),
          (1, 3, 1100, 4)]
LAYOUTS = ["contiguous", "channel-last", "sliced"]


def make(shape, dtype, device, layout="contiguous", bias=True, seed=0):
    batch, dim, seqlen, width = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "channel-last":
        x = torch.randn(batch, seqlen, dim, generator=g, dtype=torch.float64).transpose(1, 2)
    elif layout == "sliced":
        x = torch.randn(batch, dim, seqlen + 5, generator=g, dtype=torch.float64)[..., 3 : 3 + seqlen]
    else:
        x = torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64)
    w = torch.randn(dim, width, generator=g, dtype=torch.float64) / width**0.5
    b = torch.randn(dim, generator=g, dtype=torch.float64) if bias else None
    convert = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return convert(x), convert(w), convert(b)


def reference_and_grads(inputs, grad, activation, compute_dtype, out_dtype):
    """The reference computed in compute_dtype on the given inputs, results cast to out_dtype."""
    leaves = [None if t is None else t.detach().cpu().to(compute_dtype).requires_grad_() for t in inputs]
    out = causal_conv1d_reference(*leaves, activation=activation)
    out.backward(grad.cpu().to(compute_dtype))
    grads = [None if t is None else t.grad.to(out_dtype) for t in leaves]
    return out.detach().to(out_dtype), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_matches_reference(shape, dtype, device, activation):
    for layout, bias in (("contiguous", True), ("channel-last", False), ("sliced", True)):
        inputs = make(shape, dtype, device, layout, bias)
        leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
        out = shammie.causal_conv1d_fn(*leaves, activation=activation)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        out.backward(grad.to(device=device, dtype=dtype))
        ref64, grads64 = reference_and_grads(inputs, grad, activation, torch.float64, torch.float64)
        # The best a dtype-in, float32-accumulate kernel can do: float32 math on the same inputs, rounded.
        ref_low, grads_low = reference_and_grads(inputs, grad, activation, torch.float32 if dtype != torch.float64 else torch.float64, dtype)
        assert_matches_reference(out.detach(), ref64, ref_low, f"out [{layout}]")
        for name, leaf, g64, glow in zip(("x", "weight", "bias"), leaves, grads64, grads_low):
            if leaf is not None:
                assert_matches_reference(leaf.grad, g64, glow, f"grad {name} [{layout}]")


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_cpu_instruction_set_copy(isa, monkeypatch):
    monkeypatch.setenv("SHAMMIE_CPU_ISA", isa)
    x, w, b = make((2, 16, 151, 4), torch.float32, "cpu")
    torch.testing.assert_close(shammie.causal_conv1d_fn(x, w, b, activation="silu"),
                               causal_conv1d_reference(x.double(), w.double(), b.double(), "silu").float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps, state_len, width", [(1, 3, 4), (1, 7, 4), (5, 3, 4), (2, 1, 2), (3, 4, 1)])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_update_matches_reference_and_shifts_state(steps, state_len, width, dtype, device, activation):
    g = torch.Generator().manual_seed(2)
    batch, dim = 3, 6
    x = torch.randn(batch, dim, steps, generator=g, dtype=torch.float64)
    state = torch.randn(batch, dim, state_len, generator=g, dtype=torch.float64)
    w = torch.randn(dim, width, generator=g, dtype=torch.float64)
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    ref_out, ref_state = causal_conv1d_update_reference(x, state, w, b, activation)
    cast = lambda t: t.to(device=device, dtype=dtype)
    state_dev = cast(state)
    out = shammie.causal_conv1d_update(cast(x), state_dev, cast(w), cast(b), activation)
    low_out, _ = causal_conv1d_update_reference(*(cast(t).cpu().float() if dtype != torch.float64 else t for t in (x, state, w, b)), activation)
    assert_matches_reference(out, ref_out, low_out.to(dtype), "out")
    torch.testing.assert_close(state_dev.cpu(), ref_state.to(dtype), rtol=0, atol=0)   # a pure shift: exact


@pytest.mark.parametrize("device", DEVICES)
def test_update_with_2d_x_and_channel_last_state_equals_running_the_whole_sequence(device):
    # Decoding token by token from a zero state reproduces the full causal conv.
    batch, dim, seqlen, width = 2, 8, 9, 4
    x, w, b = make((batch, dim, seqlen, width), torch.float64, device)
    full = shammie.causal_conv1d_fn(x, w, b, activation="silu")
    state = torch.zeros(batch, width - 1, dim, dtype=torch.float64, device=device).transpose(1, 2)  # channel-last
    steps = [shammie.causal_conv1d_update(x[:, :, t], state, w, b, "silu") for t in range(seqlen)]
    torch.testing.assert_close(torch.stack(steps, dim=-1), full)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    for width, activation, bias in ((4, "silu", True), (3, None, False), (1, "silu", True)):
        x, w, b = make((2, 3, 11, width), torch.float64, device, "channel-last", bias)
        inputs = [t.requires_grad_() for t in (x, w) + ((b,) if bias else ())]
        fn = lambda x, w, *b: shammie.causal_conv1d_fn(x, w, b[0] if b else None, activation=activation)
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_and_forward_mode_ad_are_clear_errors(device):
    x, w, b = make((2, 3, 11, 4), torch.float64, device)
    fn = lambda x, w, b: shammie.causal_conv1d_fn(x, w, b, activation="silu")
    assert_differentiable_once(fn, [t.requires_grad_() for t in (x, w, b)], "causal_conv1d")


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_folds_x_and_seq_idx_into_the_batch(device):
    """vmap over x and seq_idx is one call with the vmapped dim folded into the batch; vmap over the
    weight runs once per element."""
    x, w, b = make((2, 4, 11, 3), torch.float32, device)
    three = lambda t: torch.stack([t, 0.5 * t, -t])
    seq_idx = (torch.arange(11, device=device) >= torch.tensor([[4], [7]], device=device)).int()
    conv = lambda x, w, seq_idx: shammie.causal_conv1d_fn(x, w, b, seq_idx, activation="silu")
    assert_vmap_rule("causal_conv1d", conv, [three(x), w, torch.stack([seq_idx, 1 - seq_idx, seq_idx])], (0, None, 0),
                     folds=True)
    assert_vmap_rule("causal_conv1d", conv, [three(x), w, seq_idx], (0, None, None), folds=True)
    assert_vmap_rule("causal_conv1d", conv, [x, three(w), seq_idx], (None, 0, None), folds=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_torch_func_transforms(bias, device):
    """grad, per-sample gradients and jacrev (shammie/_functorch.py), also through initial_states."""
    x, w, b = make((3, 4, 11, 4), torch.float64, device)
    if bias:
        assert_torch_func_transforms(lambda x, w, b: shammie.causal_conv1d_fn(x, w, b, activation="silu"), [x, w, b],
                                     "causal_conv1d")
    else:
        assert_torch_func_transforms(lambda x, w: shammie.causal_conv1d_fn(x, w), [x, w], "causal_conv1d")
    initial = torch.randn(1, 4, 3, dtype=torch.float64, device=device)   # the same for every example
    with_initial = lambda x, w, initial=initial: shammie.causal_conv1d_fn(
        x, w, initial_states=initial.expand(x.shape[0], -1, -1).contiguous())
    assert_torch_func_transforms(with_initial, [x, w], "causal_conv1d")
    loss = lambda initial: with_initial(x, w, initial).square().sum()
    leaf = initial.clone().requires_grad_()
    torch.testing.assert_close(torch.func.grad(loss)(initial), torch.autograd.grad(loss(leaf), leaf)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, w, b = make((2, 4, 13, 4), torch.float32, device)
    for bias in (b, None):
        for silu in (True, False):
            torch.library.opcheck(torch.ops.shammie.causal_conv1d, (x, w, bias, silu))
            torch.library.opcheck(torch.ops.shammie.causal_conv1d, (x.requires_grad_(), w.requires_grad_(), bias, silu))
            x, w = x.detach(), w.detach()
            torch.library.opcheck(torch.ops.shammie.causal_conv1d_backward, (torch.randn_like(x), x, w, bias, silu))
    state = torch.randn(2, 4, 5, device=device)
    torch.library.opcheck(torch.ops.shammie.causal_conv1d_update, (x[:, :, 0], state, w, b, True))
    torch.library.opcheck(torch.ops.shammie.causal_conv1d_update, (x[:, :, :3], state, w, None, False))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x, w, b = make((2, 4, 13, 4), torch.float32, device)
    w.requires_grad_()

    def block(x, w, b, state, token):
        y = shammie.causal_conv1d_fn(x * 2, w, b, activation="silu")
        step = shammie.causal_conv1d_update(token, state, w.detach(), b, "silu")
        return y.sum(dim=-1) + step

    compiled = compile_fullgraph(block, device)
    state_eager, state_compiled = torch.randn(2, 4, 3, device=device), None
    state_compiled = state_eager.clone()
    token = torch.randn(2, 4, device=device)
    eager = block(x, w, b, state_eager, token)
    (gw_eager,) = torch.autograd.grad(eager.sum(), w)
    got = compiled(x, w, b, state_compiled, token)
    (gw,) = torch.autograd.grad(got.sum(), w)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(gw, gw_eager)
    torch.testing.assert_close(state_compiled, state_eager)   # the in-place update happened once


def _bad_cases():
    x, w, b = make((2, 4, 9, 4), torch.float32, "cpu")
    return {
        "x rank": ((x[0], w, b), ValueError, "x must be 3-D"),
        "weight rank": ((x, w[0], b), ValueError, "weight must be 2-D"),
        "weight dim": ((x, w[:3], b), ValueError, r"weight must have shape \(dim, width\) with dim = 4"),
        "bias shape": ((x, w, b[:2]), ValueError, r"bias must have shape \(4,\)"),
        "mixed dtypes": ((x, w.double(), b), TypeError, "weight must have the same dtype as x"),
        "integer dtype": ((x.long(), w.long(), b.long()), TypeError, "x must be float32, float16, bfloat16 or float64"),
        "mixed devices": ((x, w.to("meta"), b), ValueError, "weight must be on the same device as x"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_is_a_clear_error(case):
    args, error, message = _bad_cases()[case]
    with pytest.raises(error, match=message):
        shammie.causal_conv1d_fn(*args, activation="silu")
    if case != "mixed devices":
        with pytest.raises(error, match=message):   # the fake says the same under torch.compile
            shammie.causal_conv1d_fn(*[a.to("meta") for a in args], activation="silu")


def test_bad_activation_and_update_state():
    x, w, b = make((2, 4, 9, 4), torch.float32, "cpu")
    with pytest.raises(ValueError, match="activation must be None, 'silu' or 'swish'"):
        shammie.causal_conv1d_fn(x, w, b, activation="relu")
    with pytest.raises(ValueError, match=r"state_len \(2\) must be at least width - 1 = 3"):
        shammie.causal_conv1d_update(x[:, :, 0], torch.zeros(2, 4, 2), w, b)
    with pytest.raises(ValueError, match=r"conv_state must be \(batch, dim, state_len\)"):
        shammie.causal_conv1d_update(x[:, :, 0], torch.zeros(2, 5, 3), w, b)
    with pytest.raises(TypeError, match="conv_state must have the same dtype as x"):
        shammie.causal_conv1d_update(x[:, :, 0], torch.zeros(2, 4, 3, dtype=torch.float64), w, b)


# ---- causal-conv1d's chunking arguments: initial_states, return_final_states, final_states_out ----

def chunked_reference(x, w, b, initial, activation):
    """The reference on [initial, x] (zeros when initial is None), and its last width − 1 inputs."""
    history = w.shape[1] - 1
    if initial is None:
        initial = x.new_zeros(x.shape[0], x.shape[1], history)
    full = torch.cat([initial, x], dim=-1)
    out = causal_conv1d_reference(full, w, b, activation=activation)[..., history:]
    return out, full[..., full.shape[-1] - history:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 1, 4), (2, 5, 2, 4), (1, 3, 129, 2), (2, 16, 37, 4), (2, 5, 7, 1)], ids=str)
@pytest.mark.parametrize("with_initial", [True, False])
def test_initial_and_final_states_match_reference(shape, dtype, device, with_initial):
    x, w, b = make(shape, dtype, device)
    batch, dim, _, width = shape
    initial = (torch.randn(batch, dim, width - 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
               .to(device=device, dtype=dtype) if with_initial else None)
    out, final = shammie.causal_conv1d_fn(x, w, b, initial_states=initial, return_final_states=True,
                                          activation="silu")
    to64 = lambda t: None if t is None else t.cpu().double()
    ref_out, ref_final = chunked_reference(to64(x), to64(w), to64(b), to64(initial), "silu")
    low = torch.float64 if dtype == torch.float64 else torch.float32
    to_low = lambda t: None if t is None else t.cpu().to(low)
    low_out, _ = chunked_reference(to_low(x), to_low(w), to_low(b), to_low(initial), "silu")
    assert_matches_reference(out, ref_out, low_out.to(dtype), "out")
    assert torch.equal(final.cpu().double(), ref_final)   # a copy of inputs: exact


def test_chunks_with_carried_states_equal_one_pass():
    """What the arguments are for: a long sequence in chunks, each started from the last one's states."""
    x, w, b = make((2, 6, 100, 4), torch.float32, "cpu")
    whole = shammie.causal_conv1d_fn(x, w, b, activation="silu")
    states, pieces = None, []
    for chunk in x.split([1, 2, 40, 57], dim=-1):
        out, states = shammie.causal_conv1d_fn(chunk, w, b, initial_states=states, return_final_states=True,
                                               activation="silu")
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=-1), whole, rtol=0, atol=0)


def test_initial_states_gradcheck_and_final_states_out():
    x, w, b = make((2, 3, 9, 3), torch.float64, "cpu")
    initial = torch.randn(2, 3, 2, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, w, b, initial)]

    def fn(x, w, b, initial):
        out, final = shammie.causal_conv1d_fn(x, w, b, initial_states=initial, return_final_states=True,
                                              activation="silu")
        return out, final

    assert torch.autograd.gradcheck(fn, args)
    buffer = torch.full((2, 3, 2), float("nan"), dtype=torch.float64)
    _, final = shammie.causal_conv1d_fn(x, w, b, return_final_states=True, final_states_out=buffer)
    assert final is buffer and torch.equal(buffer, x[..., -2:])
    # The state is its own tensor (as causal-conv1d returns): the decode step updates it in place,
    # which must not write into the prompt.
    _, final = shammie.causal_conv1d_fn(x, w, b, return_final_states=True)
    prompt = x.clone()
    shammie.causal_conv1d_update(torch.randn(2, 3, dtype=torch.float64), final, w, b)
    assert torch.equal(x, prompt)


@pytest.mark.parametrize("device", DEVICES)
def test_update_bumps_the_state_version_and_refuses_a_state_requiring_grad(device):
    x, w, b = make((2, 3, 1, 4), torch.float32, device)
    state = torch.randn(2, 3, 3, device=device)
    version = state._version
    with torch.inference_mode():   # a normal tensor written in inference mode still counts the write
        shammie.causal_conv1d_update(x[:, :, 0], state, w, b, "silu")
    torch.ops.shammie.causal_conv1d_update(x[:, :, 0], state, w, b, True)
    assert state._version == version + 2
    # Autograd saved the state (through an alias sharing its version counter): the update is seen.
    leaf = torch.randn(2, 3, 3, device=device, requires_grad=True)
    saved = leaf * 1.0
    y = (saved * saved).sum()
    shammie.causal_conv1d_update(x[:, :, 0], saved.detach(), w, b)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="causal_conv1d_update: conv_state requires grad"):
        shammie.causal_conv1d_update(x[:, :, 0], leaf, w, b)
    assert torch.equal(leaf.detach(), before)
    with torch.no_grad():
        shammie.causal_conv1d_update(x[:, :, 0], leaf, w, b)   # as torch allows an in-place op on a leaf
    # No derivative: a backward through out raises instead of leaving x.grad silently None.
    out = shammie.causal_conv1d_update(x[:, :, 0].clone().requires_grad_(), state, w, b)
    with pytest.raises(RuntimeError, match="derivative for shammie::causal_conv1d_update is not implemented"):
        out.sum().backward()


def test_chunking_arguments_bad_input():
    x, w, b = make((2, 4, 9, 4), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"initial_states must have shape \(batch, dim, width - 1\) = \(2, 4, 3\)"):
        shammie.causal_conv1d_fn(x, w, b, initial_states=torch.zeros(2, 4, 2))
    with pytest.raises(TypeError, match="initial_states must have x's dtype and device"):
        shammie.causal_conv1d_fn(x, w, b, initial_states=torch.zeros(2, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"final_states_out must have shape \(2, 4, 3\)"):
        shammie.causal_conv1d_fn(x, w, b, return_final_states=True, final_states_out=torch.zeros(2, 4, 2))
    wrong = torch.zeros(2, 4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"final_states_out must have x's dtype and device \(torch.float32, cpu\)"):
        shammie.causal_conv1d_fn(x, w, b, return_final_states=True, final_states_out=wrong)
    assert not wrong.any()   # checked before anything is written
    with pytest.raises(ValueError, match=r"seq_idx must have shape \(batch, seqlen\) = \(2, 9\)"):
        shammie.causal_conv1d_fn(x, w, b, seq_idx=torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="seq_idx must be int32 or int64"):
        shammie.causal_conv1d_fn(x, w, b, seq_idx=torch.zeros(2, 9))
    with pytest.raises(ValueError, match="seq_idx must be on the same device as x"):
        shammie.causal_conv1d_fn(x, w, b, seq_idx=torch.zeros(2, 9, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match=r"seq_idx must have shape \(batch, seqlen\) = \(2, 9\)"):
        shammie.causal_conv1d_fn(x, w, b, seq_idx=torch.zeros(2, 8, dtype=torch.int64),
                                 initial_states=torch.zeros(2, 4, 3))
    with pytest.raises(TypeError, match="pass activation= by keyword"):
        shammie.causal_conv1d_fn(x, w, b, "silu")


# Packed sequences: row 0 holds runs of 1, 2 (shorter than the window), 9 and seqlen − 12 steps; row 1
# one run (ids need not start at 0); row 2 a run per step (at seqlen 40; runs of seqlen // 40 steps above).
def packed_seq_idx(seqlen=40):
    rows = [torch.repeat_interleave(torch.arange(4), torch.tensor([1, 2, 9, seqlen - 12])),
            torch.full((seqlen,), 7), torch.arange(seqlen) // max(1, seqlen // 40)]
    return torch.stack(rows).to(torch.int32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("seqlen", [40, 1100])   # 1,100: runs across the CUDA backward's chunk boundary
def test_packed_sequences_match_separate_runs(dtype, device, activation, with_initial, seqlen):
    x, w, b = make((3, 5, seqlen, 4), dtype, device, layout="channel-last")
    seq_idx = packed_seq_idx(seqlen).to(device)
    initial = (torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
               .to(device, dtype) if with_initial else None)
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, w, b, initial)]
    out = shammie.causal_conv1d_fn(leaves[0], leaves[1], leaves[2], seq_idx=seq_idx, initial_states=leaves[3],
                                   activation=activation)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad.to(device=device, dtype=dtype))

    def reference(compute_dtype, out_dtype):
        ref_leaves = [None if t is None else t.detach().cpu().to(compute_dtype).requires_grad_()
                      for t in (x, w, b, initial)]
        ref = causal_conv1d_packed_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2], seq_idx.cpu(),
                                             activation, initial_states=ref_leaves[3])
        ref.backward(grad.to(compute_dtype))
        return ref.detach().to(out_dtype), [None if t is None else t.grad.to(out_dtype) for t in ref_leaves]

    ref64, grads64 = reference(torch.float64, torch.float64)
    ref_low, grads_low = reference(torch.float32 if dtype != torch.float64 else torch.float64, dtype)
    assert_matches_reference(out.detach(), ref64, ref_low, "out")
    for name, leaf, g64, glow in zip(("x", "weight", "bias", "initial_states"), leaves, grads64, grads_low):
        if leaf is not None:
            assert_matches_reference(leaf.grad, g64, glow, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_packed_sequences_gradcheck_and_opcheck(device):
    x, w, b = make((3, 3, 17, 3), torch.float64, device)
    seq_idx = packed_seq_idx(17).to(device)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    fn = lambda x, w, b: shammie.causal_conv1d_fn(x, w, b, seq_idx=seq_idx, activation="silu")
    assert torch.autograd.gradcheck(fn, args)
    torch.library.opcheck(torch.ops.shammie.causal_conv1d, (x, w, b, True, seq_idx.long()))
    torch.library.opcheck(torch.ops.shammie.causal_conv1d, (*args, False, seq_idx))
    torch.library.opcheck(torch.ops.shammie.causal_conv1d_backward, (torch.randn_like(x), x, w, None, True, seq_idx))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_initial", [False, True])
def test_packed_sequences_final_states_continue_the_last_sequence(with_initial, device):
    # Each row's last sequence: 1, 2 and 5 steps long (width - 1 = 3), and one sequence on the whole row.
    seq_idx = torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1], [0, 2, 2, 2, 2, 2], [3] * 6],
                           dtype=torch.int32, device=device)
    x, w, b = make((4, 3, 6, 4), torch.float64, device)
    initial = torch.randn(4, 3, 3, dtype=torch.float64, device=device) if with_initial else None
    _, final = shammie.causal_conv1d_fn(x, w, b, seq_idx=seq_idx, initial_states=initial, return_final_states=True)
    last_len = [1, 2, 5, 6]
    expected = torch.zeros(4, 3, 3, dtype=torch.float64, device=device)
    for row, n in enumerate(last_len):
        tail = x[row, :, -n:]
        if n == 6 and with_initial:   # a single sequence: the initial states are its start
            tail = torch.cat([initial[row], tail], dim=-1)
        expected[row, :, 3 - min(n, 3):] = tail[:, -3:]
    torch.testing.assert_close(final, expected, rtol=0, atol=0)
    # Decoding from it continues the last sequence alone.
    token = torch.randn(4, 3, dtype=torch.float64, device=device)
    step = shammie.causal_conv1d_update(token, final, w, b, "silu")
    for row, n in enumerate(last_len):
        alone = torch.cat([x[row:row + 1, :, -n:], token[row:row + 1, :, None]], dim=-1)
        start = initial[row:row + 1] if n == 6 and with_initial else None
        whole = shammie.causal_conv1d_fn(alone, w, b, initial_states=start, activation="silu")
        torch.testing.assert_close(step[row], whole[0, :, -1])
    leaves = [t.clone().requires_grad_() for t in (x, w, b) + ((initial,) if with_initial else ())]
    fn = lambda x, w, b, *init: shammie.causal_conv1d_fn(x, w, b, seq_idx=seq_idx, initial_states=init[0] if init else None,
                                                         return_final_states=True)
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps, state_len", [(1, 3), (2, 5), (6, 3)])
def test_update_circular_cache_with_indices_equals_the_whole_sequence(steps, state_len, dtype, device):
    """Decoding in chunks of `steps` through circular conv_state rows (cache_seqlens) of a larger
    cache (conv_state_indices, with a padding element) reproduces the full causal conv."""
    batch, dim, seqlen, width = 2, 6, 12, 4
    x, w, b = make((batch, dim, seqlen, width), dtype, device)
    full = causal_conv1d_reference(*(t.cpu().double() for t in (x, w, b)), activation="silu")
    cache = torch.randn(5, dim, state_len, device=device, dtype=dtype)
    rows = torch.tensor([3, -1, 0], device=device)
    cache[rows[rows >= 0]] = 0   # the sequences start from zeros
    untouched = cache[[1, 2, 4]].clone()
    x3 = torch.cat([x[:1], torch.full_like(x[:1], float("nan")), x[1:]])   # element 1 pads: never read
    outs = []
    for t0 in range(0, seqlen, steps):
        lengths = torch.full((3,), t0, device=device, dtype=torch.int32)
        outs.append(shammie.causal_conv1d_update(x3[..., t0 : t0 + steps], cache, w, b, "silu",
                                                 cache_seqlens=lengths, conv_state_indices=rows))
    out = torch.cat(outs, dim=-1)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu())), "a padding element's out is zero"
    low = causal_conv1d_reference(*(t.cpu().float() if dtype != torch.float64 else t.cpu() for t in (x, w, b)),
                                  activation="silu")
    assert_matches_reference(out[[0, 2]], full, low.to(dtype), "out")
    assert torch.equal(cache[[1, 2, 4]], untouched), "rows no element names must not change"
    for pos in range(seqlen - state_len, seqlen):   # circular: stream position pos sits in slot pos % state_len
        assert torch.equal(cache[3, :, pos % state_len], x[0, :, pos]), f"slot of position {pos}"


@pytest.mark.parametrize("device", DEVICES)
def test_update_circular_cache_of_width_1_has_no_state(device):
    """Width 1 needs no history: state_len 0 with cache_seqlens is a plain pointwise step."""
    x, w, b = make((2, 3, 4, 1), torch.float32, device)
    out = shammie.causal_conv1d_update(x, torch.zeros(2, 3, 0, device=device), w, b, "silu",
                                       cache_seqlens=torch.tensor([5, 0], device=device))
    torch.testing.assert_close(out, torch.nn.functional.silu(x * w[None] + b[None, :, None]))


@pytest.mark.parametrize("device", DEVICES)
def test_update_continuous_batching_opcheck_and_bad_input(device):
    x, w, b = make((2, 4, 3, 4), torch.float32, device)
    cache = torch.randn(3, 4, 5, device=device)
    rows, lengths = torch.tensor([2, 0], device=device), torch.tensor([7, 0], device=device, dtype=torch.int32)
    torch.library.opcheck(torch.ops.shammie.causal_conv1d_update, (x, cache, w, b, True, rows, lengths))
    call = lambda **kw: shammie.causal_conv1d_update(x, cache, w, b, "silu", **kw)
    for kwargs, error, message in (
            (dict(conv_state_indices=torch.tensor([3, 0])), ValueError,
             r"conv_state_indices\[0\] = 3 is not a state row in \[0, 3\) or -1"),
            (dict(conv_state_indices=torch.tensor([1, 1])), ValueError, "names state row 1 twice"),
            (dict(conv_state_indices=torch.tensor([1.0, 0.0])), TypeError,
             "conv_state_indices must be int32 or int64"),
            (dict(cache_seqlens=torch.tensor([1, -1]), conv_state_indices=rows), ValueError,
             r"cache_seqlens\[1\] = -1 must be >= 0"),
            (dict(cache_seqlens=torch.tensor([1]), conv_state_indices=rows), ValueError,
             r"cache_seqlens must have shape \(batch,\) = \(2,\)"),
            (dict(), ValueError, r"conv_state must be \(batch, dim, state_len\) = \(2, 4, state_len\)")):
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        with pytest.raises(error, match=message):
            call(**kwargs)
