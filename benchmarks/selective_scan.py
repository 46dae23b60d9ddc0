"""selective_scan_fn on a Mamba layer against HF transformers' torch paths (its Python loop, and
mambapy's parallel scan that `use_mambapy=True` selects); the decode step (selective_state_update)
against the formulation of HF transformers' Mamba decode path (torch ops on the whole (batch, dim, N) state: exp, multiply-add, matmul with C;
shammie.reference.selective_scan.selective_state_update_reference). On CUDA, where mamba_ssm
imports (its compiled selective_scan_cuda and its Triton decode kernel), both also run against
mamba_ssm itself, the issue's real peer."""

from __future__ import annotations

import torch

import shammie
from shammie.benchmarks.harness import Case
from shammie.reference.selective_scan import selective_state_update_reference

# (name, batch, heads or None, dim, N, groups): Mamba-130M (d_inner 1536, N 16) and Mamba2-2.7B
# (80 heads of 64, N 128, 1 group) decoding a batch of 16 sequences.
SHAPES = [("Mamba-130M decode", 16, None, 1536, 16, 1), ("Mamba2-2.7B decode", 16, 80, 64, 128, 1)]


def mamba_ssm_ops():
    """mamba_ssm's (selective_scan_fn, selective_state_update), or None where mamba_ssm does not import
    (it needs its compiled CUDA extension; benchmarks/device_check.sh installs a wheel built for sm_90)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except ImportError:
        return None
    return selective_scan_fn, selective_state_update


def _case(name, batch, heads, dim, N, groups, dtype, peer: str = "torch") -> Case:
    lead = (batch, heads, dim) if heads else (batch, dim)
    chan = (heads, dim) if heads else (dim,)
    bc = (batch, groups, N) if heads else (batch, N)

    def make_inputs(device):
        g = torch.Generator().manual_seed(0)
        low = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
        f32 = lambda *s: torch.randn(*s, generator=g).to(device)
        A = -torch.rand(*chan, N, generator=g).to(device)
        return [low(*lead, N), low(*lead), low(*lead), A, low(*bc), low(*bc), f32(*chan), low(*lead), f32(*chan)]

    def ours(state, x, dt, A, B, C, D, z, dt_bias):
        return shammie.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)

    def torch_peer(state, x, dt, A, B, C, D, z, dt_bias):
        out, new_state = selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
        state.copy_(new_state)
        return out

    def mamba_ssm_peer(state, x, dt, A, B, C, D, z, dt_bias):
        return mamba_ssm_ops()[1](state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)

    size = torch.empty((), dtype=dtype).element_size()
    channels = batch * (heads or 1) * dim
    return Case(
        op="selective_state_update", shape=f"{name} B={batch} {'H=' + str(heads) + ' ' if heads else ''}D={dim} N={N}",
        dtype=dtype, make_inputs=make_inputs, ours=ours, peer=mamba_ssm_peer if peer == "mamba_ssm" else torch_peer,
        peer_name=("mamba_ssm's selective_state_update (Triton)" if peer == "mamba_ssm"
                   else "torch ops on the whole state, as HF transformers' Mamba decode path"),
        bytes_forward=size * channels * (2 * N + 4), bytes_backward=0,
        flops_forward=6.0 * channels * N, flops_backward=0.0, backward=False)


def cases(device: torch.device, dtypes=None) -> list[Case]:
    dtypes_decode = dtypes or ([torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32])
    peers = ["torch"] + (["mamba_ssm"] if device.type == "cuda" and mamba_ssm_ops() else [])
    return scan_cases(device, dtypes) + [_case(*shape, dtype, peer) for dtype in dtypes_decode for shape in SHAPES
                                         for peer in peers]


# ---------------------------------------------------------------------------------------------
# selective_scan_fn on a Mamba layer: dim 1536 (Mamba-130M's inner width), N 16, with z, delta_bias
# and softplus, as HF's MambaMixer calls it. The default CPU table uses L = 512 against mambapy (the
# peers take tens of seconds at L = 2048); `shammie bench --ops selective_scan_full` runs the issue's
# shape (batch 2, L 2048) against both of transformers' paths (benchmarks/selective_scan_full.py).

SCAN_SHAPES = {"cpu": [("Mamba-130M layer", 2, 1536, 512, 16)], "cuda": [("Mamba-130M layer", 8, 1536, 2048, 16)]}
FULL_SHAPE = ("Mamba-130M layer", 2, 1536, 2048, 16)


def _hf_scan(use_mambapy: bool):
    """transformers' own torch path of `mamba_selective_scan` (not a patched one)."""
    from transformers.models.mamba import modeling_mamba

    fn = getattr(modeling_mamba.mamba_selective_scan, "__wrapped__", modeling_mamba.mamba_selective_scan)
    if fn.__module__ != modeling_mamba.__name__:
        raise RuntimeError("transformers' mamba_selective_scan is patched; benchmark outside use_shammie_kernels()")

    def scan(u, delta, A, B, C, D, z, delta_bias):
        if u.dtype in (torch.float16, torch.bfloat16):
            # Its torch path multiplies the float32 state by C in C's dtype and fails on 16-bit
            # activations: time it on float32 copies (the conversions are a small part), cast back.
            up = lambda t: t.float()
            return fn(up(u), up(delta), A, up(B), up(C), D, up(z), delta_bias, delta_softplus=True,
                      use_mambapy=use_mambapy).to(u.dtype)
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, use_mambapy=use_mambapy)

    return scan


def _scan_case(name, batch, dim, L, N, dtype, peer: str) -> Case:
    def make_inputs(device):
        g = torch.Generator().manual_seed(0)
        act = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
        f32 = lambda t: t.to(device)
        A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1)           # S4D-real init, as Mamba's
        dt_bias = torch.log(torch.expm1(torch.empty(dim).uniform_(1e-3, 1e-1, generator=g)))
        return [act(batch, dim, L), act(batch, dim, L) * 0.1, f32(A), act(batch, N, L), act(batch, N, L),
                f32(torch.ones(dim)), act(batch, dim, L), f32(dt_bias)]

    def ours(u, delta, A, B, C, D, z, delta_bias):
        return shammie.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

    def mamba_ssm_scan(u, delta, A, B, C, D, z, delta_bias):
        return mamba_ssm_ops()[0](u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

    size = torch.empty((), dtype=dtype).element_size()
    activations = batch * dim * L
    peer_fn, peer_name = {
        "mambapy": (lambda: _hf_scan(use_mambapy=True),
                    "HF transformers' mamba_selective_scan with use_mambapy=True (mambapy's parallel scan)"),
        "loop": (lambda: _hf_scan(use_mambapy=False), "HF transformers' mamba_selective_scan slow path (Python loop over L)"),
        "mamba_ssm": (lambda: mamba_ssm_scan, "mamba_ssm's selective_scan_fn (its CUDA kernel)"),
    }[peer]
    return Case(
        op="selective_scan_fn", shape=f"{name} B={batch} D={dim} L={L} N={N}", dtype=dtype, make_inputs=make_inputs,
        ours=ours, peer=peer_fn(), peer_name=peer_name,
        # reads of u, delta, z, B, C and the write of out; the backward reads those and grad_out and
        # writes du, ddelta, dz, dB, dC
        bytes_forward=size * (4 * activations + 2 * batch * N * L),
        bytes_backward=size * (7 * activations + 4 * batch * N * L),
        flops_forward=9.0 * activations * N, flops_backward=20.0 * activations * N,
        backward=peer != "loop")


def _mambapy_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mambapy") is not None


def scan_cases(device: torch.device, dtypes=None, shapes=None, peers=("mambapy",)) -> list[Case]:
    dtypes = dtypes or ([torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32])
    shapes = shapes or SCAN_SHAPES[device.type]
    if "mambapy" in peers and not _mambapy_available():
        print("selective_scan_fn: `pip install mambapy` for the use_mambapy=True peer; timing HF's Python loop instead")
        peers = list(dict.fromkeys("loop" if p == "mambapy" else p for p in peers))
    if device.type == "cuda" and mamba_ssm_ops():
        peers = [*peers, "mamba_ssm"]
    return [_scan_case(*shape, dtype, peer) for dtype in dtypes for shape in shapes for peer in peers]
