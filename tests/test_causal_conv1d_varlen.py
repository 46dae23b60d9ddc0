"""causal_conv1d_varlen_states and the packed-prefill → decode path it serves: the states against a
loop written from the contract; then one packed prefill (conv with seq_idx, Mamba-2 scan with
cu_seqlens and varlen states) continued by decode steps from those states equals running each
sequence on its own."""

import pytest
import torch

import shammie
from shammie.reference.causal_conv1d import causal_conv1d_varlen_states_reference
from conftest import DEVICES, DTYPES, assert_compiled_matches_eager

CU = [0, 1, 4, 4, 20, 23]   # lengths 1, 3, 0 (empty), 16, 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("state_len", [0, 1, 3, 5])
def test_matches_the_contract(state_len, dtype, device):
    x = torch.randn(23, 6, dtype=dtype, device=device)
    got = shammie.causal_conv1d_varlen_states(x, torch.tensor(CU, device=device, dtype=torch.int32), state_len)
    assert got.shape == (5, 6, state_len) and got.dtype == dtype and got.device == x.device
    assert state_len == 0 or got.stride(1) == 1, "dim contiguous, as causal_conv1d_update's conv_state"
    assert torch.equal(got.cpu(), causal_conv1d_varlen_states_reference(x.cpu(), torch.tensor(CU), state_len))


def test_gradients_and_compile():
    x = torch.randn(23, 4, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor(CU)
    assert torch.autograd.gradcheck(lambda t: shammie.causal_conv1d_varlen_states(t, cu, 4), (x,))
    assert_compiled_matches_eager(lambda t: shammie.causal_conv1d_varlen_states(t, cu, 4).square().sum(), [x])


@pytest.mark.parametrize("device", DEVICES)
def test_packed_prefill_then_decode_equals_each_sequence_alone(device):
    """A Mamba-2 layer's conv and scan over packed prompts (batch 1), then decode steps for all of them
    from the varlen states, rows of a state cache in shuffled order: equal to each sequence run alone."""
    g = torch.Generator().manual_seed(0)
    heads, headdim, dstate, width, steps = 4, 3, 8, 4, 5
    dim = heads * headdim
    lengths = [7, 2, 30]
    cu = torch.tensor([0, 7, 9, 39], device=device)
    total = sum(lengths) + steps * len(lengths)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)
    tokens = [r(n + steps, dim) for n in lengths]   # each sequence's prompt, then its decoded inputs
    dts = [r(n + steps, heads) for n in lengths]
    Bs, Cs = [r(n + steps, dstate) for n in lengths], [r(n + steps, dstate) for n in lengths]
    weight, bias = r(dim, width) * 0.5, r(dim) * 0.1
    A, D, dt_bias = -torch.rand(heads, generator=g, dtype=torch.float64).to(device) - 0.1, r(heads), r(heads) * 0.1
    assert total == sum(t.shape[0] for t in tokens)

    def layer_alone(s):   # conv + scan over the whole sequence (prompt and decoded steps)
        x = shammie.causal_conv1d_fn(tokens[s].T[None], weight, bias, activation="silu")[0].T
        return shammie.mamba_chunk_scan_combined(x.view(1, -1, heads, headdim), dts[s][None], A,
                                                 Bs[s][None, :, None], Cs[s][None, :, None], D=D, dt_bias=dt_bias,
                                                 dt_softplus=True)[0]   # (L, heads, headdim)

    # Packed prefill of the prompts.
    prompt = lambda parts: torch.cat([p[:n] for p, n in zip(parts, lengths)])
    seq_idx = torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(lengths, device=device))[None]
    x = shammie.causal_conv1d_fn(prompt(tokens).T[None], weight, bias, seq_idx=seq_idx, activation="silu")[0].T
    _, ssm_states = shammie.mamba_chunk_scan_combined(
        x.view(1, -1, heads, headdim), prompt(dts)[None], A, prompt(Bs)[None, :, None], prompt(Cs)[None, :, None],
        D=D, dt_bias=dt_bias, dt_softplus=True, cu_seqlens=cu, return_varlen_states=True)
    conv_states = shammie.causal_conv1d_varlen_states(prompt(tokens), cu, width - 1)
    # Decode: the sequences sit in rows 2, 0, 3 of caches with a spare row.
    rows = torch.tensor([2, 0, 3], device=device)
    conv_cache = torch.zeros(4, dim, width - 1, dtype=torch.float64, device=device)
    ssm_cache = torch.zeros(4, heads, headdim, dstate, dtype=torch.float64, device=device)
    conv_cache[rows], ssm_cache[rows] = conv_states, ssm_states
    per_head = lambda t: t[:, None].expand(-1, headdim)
    for t in range(steps):
        step = lambda parts: torch.stack([p[n + t] for p, n in zip(parts, lengths)])
        xt = shammie.causal_conv1d_update(step(tokens), conv_cache, weight, bias, "silu", conv_state_indices=rows)
        yt = shammie.selective_state_update(
            ssm_cache, xt.view(3, heads, headdim), step(dts)[..., None].expand(-1, -1, headdim),
            A[:, None, None].expand(-1, headdim, dstate), step(Bs)[:, None], step(Cs)[:, None], D=per_head(D),
            dt_bias=per_head(dt_bias), dt_softplus=True, state_batch_indices=rows)
        for s in range(3):
            torch.testing.assert_close(yt[s], layer_alone(s)[lengths[s] + t], rtol=1e-9, atol=1e-9)


def test_bad_input():
    x = torch.randn(10, 3)
    call = lambda cu, state_len=3, x=x: shammie.causal_conv1d_varlen_states(x, torch.tensor(cu), state_len)
    for args, error, message in (
            (([0, 4, 9],), ValueError, r"must run from 0 to total_tokens \(10\), got 0 \.\. 9"),
            (([0, 6, 4, 10],), ValueError, r"non-decreasing, got cu_seqlens\[1\] = 6 > cu_seqlens\[2\] = 4"),
            (([0, 10], -1), ValueError, "state_len must be a non-negative int"),
            (([0.0, 10.0],), TypeError, "cu_seqlens must be int32 or int64"),
            (([0, 10], 3, x[None]), ValueError, r"x must be \(total_tokens, dim\)")):
        with pytest.raises(error, match=message):
            call(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_steps_with_state_indices_capture_in_a_cuda_graph():
    """Inside a capture the index checks cannot copy to the host; the ops skip them there (the kernels
    keep rows outside the cache as padding) and the replayed graph equals eager steps."""
    device, dim, width, heads, headdim, dstate = "cuda", 8, 4, 2, 4, 16
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(device)
    x, weight, rows = r(3, dim), r(dim, width), torch.tensor([4, -1, 0], device=device)
    xs, dt, B, C = r(3, heads, headdim), r(3, heads, headdim), r(3, 1, dstate), r(3, 1, dstate)
    A = -torch.rand(heads, headdim, dstate, generator=g).to(device)
    conv0, ssm0 = r(6, dim, width - 1), r(6, heads, headdim, dstate)

    def step(conv_cache, ssm_cache):
        a = shammie.causal_conv1d_update(x, conv_cache, weight, None, "silu", conv_state_indices=rows)
        b = shammie.selective_state_update(ssm_cache, xs, dt, A, B, C, dt_softplus=True, state_batch_indices=rows)
        return a, b

    eager_conv, eager_ssm = conv0.clone(), ssm0.clone()
    eager = step(eager_conv, eager_ssm)
    conv, ssm = conv0.clone(), ssm0.clone()
    step(conv.clone(), ssm.clone())   # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(conv, ssm)
    conv.copy_(conv0)
    ssm.copy_(ssm0)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip((*captured, conv, ssm), (*eager, eager_conv, eager_ssm)):
        torch.testing.assert_close(got, want)
