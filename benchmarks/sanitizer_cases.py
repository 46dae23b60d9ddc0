"""Small CUDA cases for compute-sanitizer (benchmarks/device_check.sh): every kernel of every op,
including the partial-tile, global-scratch and odd-shape paths, forward and backward, and both
implementations of the ops that have two.
    python benchmarks/sanitizer_cases.py [family ...]"""

import importlib.util
import os
import sys

import torch

import shammie

# Op families to run (monarch, conv1d, state_update, selective_scan, ssd, frechet, tree): all by default.
ONLY = set(sys.argv[1:])
IMPLS = ("kernel", "gemm")
# SHAMMIE_SANITIZE_DTYPES="float32" narrows every family to those dtypes (racecheck, which is slow,
# needs one: the shared-memory schedule does not depend on the dtype).
DTYPE_NAMES = os.environ.get("SHAMMIE_SANITIZE_DTYPES", "").split()


def dtypes(*candidates):
    return [d for d in candidates if not DTYPE_NAMES or str(d).removeprefix("torch.") in DTYPE_NAMES]


def wants(family):
    return not ONLY or family in ONLY


cases = [
    # (tokens, k, q, p, l, s, r)
    (37, 3, 5, 7, 5, 9, 3),        # odd sizes, partial tile
    (5, 4, 4, 64, 4, 64, 4),       # MoRe-like
    (3, 2, 32, 33, 4, 17, 16),     # wide q, r
    (2, 16, 1024, 2, 128, 8, 128),  # k·q = 16384: 64 KB of fp32 u per token, global scratch in both passes
]
for impl in IMPLS if wants("monarch") else ():   # both implementations (fused kernels, GEMMs)
    os.environ["SHAMMIE_MONARCH_IMPL"] = impl
    for dtype in dtypes(torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for tokens, k, q, p, l, s, r in cases:
            x = torch.randn(tokens, k * p, device="cuda", dtype=dtype, requires_grad=True)
            w1 = torch.randn(k, q, p, device="cuda", dtype=dtype, requires_grad=True)
            w2 = torch.randn(l, s, r, device="cuda", dtype=dtype, requires_grad=True)
            shammie.blockdiag_butterfly_multiply(x, w1, w2).sum().backward()
if wants("conv1d"):
    for dtype in dtypes(torch.float32, torch.bfloat16, torch.float64):
        for batch, dim, seqlen, width in ((2, 5, 1, 4), (1, 3, 129, 2), (2, 7, 37, 5), (1, 2, 1100, 4)):   # 2 chunks
            x = torch.randn(batch, seqlen, dim, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
            w = torch.randn(dim, width, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(dim, device="cuda", dtype=dtype, requires_grad=True)
            shammie.causal_conv1d_fn(x, w, b, activation="silu").sum().backward()
            # packed sequences: a run per step, then one run
            seq_idx = torch.arange(seqlen, device="cuda", dtype=torch.int32).clamp(max=seqlen // 2).expand(batch, seqlen)
            shammie.causal_conv1d_fn(x, w, b, seq_idx=seq_idx, activation="silu").sum().backward()
            state = torch.randn(batch, dim, width + 1, device="cuda", dtype=dtype)
            shammie.causal_conv1d_update(x[:, :, :2].detach(), state, w.detach(), None, None)
            # continuous batching: rows of a larger circular cache, the first element padding
            cache = torch.randn(batch + 2, dim, width + 1, device="cuda", dtype=dtype)
            rows = torch.arange(batch, device="cuda") + 1
            rows[0] = -1
            shammie.causal_conv1d_update(x[:, :, :3].detach(), cache, w.detach(), b.detach(), "silu",
                                         cache_seqlens=torch.arange(batch, device="cuda") * 5, conv_state_indices=rows)
if wants("state_update"):
    for dtype in dtypes(torch.float32, torch.bfloat16, torch.float64):
        for lead, chan, bc, N in (((3, 7), (7,), (3, 16), 16), ((2, 4, 5), (4, 5), (2, 2, 64), 64)):
            state = torch.randn(*lead, N, device="cuda", dtype=dtype)
            x, dt, z = (torch.randn(*lead, device="cuda", dtype=dtype) for _ in range(3))
            B, C = (torch.randn(*bc, device="cuda", dtype=dtype) for _ in range(2))
            A = -torch.rand(*chan, N, device="cuda")
            shammie.selective_state_update(state, x, dt, A, B, C, torch.randn(*chan, device="cuda"), z,
                                           torch.randn(*chan, device="cuda"), dt_softplus=True)
            cache = torch.randn(lead[0] + 3, *lead[1:], N, device="cuda", dtype=dtype)   # rows of a larger cache
            rows = torch.arange(lead[0], device="cuda").flip(0) + 2
            rows[-1] = -1
            shammie.selective_state_update(cache, x, dt, A, B, C, z=z, dt_softplus=True, state_batch_indices=rows)
if wants("selective_scan"):
    def scan(batch, dim, L, N, form, dtype):
        shape = {"variable": (batch, N, L), "grouped": (batch, dim if dim % 5 == 0 and dim != 5 else 1, N, L),
                 "constant": (dim, N)}[form]
        bc_dtype = torch.float32 if form == "constant" else dtype
        u, delta, z = (torch.randn(batch, dim, L, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        B, C = (torch.randn(*shape, device="cuda", dtype=bc_dtype, requires_grad=True) for _ in range(2))
        A = (-torch.rand(dim, N, device="cuda")).requires_grad_()
        D, bias = (torch.randn(dim, device="cuda", requires_grad=True) for _ in range(2))
        out, last = shammie.selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True)
        (out.float().sum() + last.sum()).backward()

    for deterministic in (False, True):   # the default backward's atomics; the fixed-order sums
        torch.use_deterministic_algorithms(deterministic)
        for dtype in dtypes(torch.float32, torch.bfloat16, torch.float64):
            # (batch, dim, L, N, B/C form): odd dims, tails of tiles and intervals, N > 32 across warps, groups
            for case in ((2, 7, 37, 16, "variable"), (1, 3, 70, 1, "constant"), (1, 5, 130, 64, "grouped"),
                         (1, 2, 40, 256, "variable"), (2, 20, 33, 4, "grouped")):
                scan(*case, dtype)
        if deterministic:   # a 1 MiB workspace cap: two rounds of channels per block
            os.environ["SHAMMIE_SCAN_WORKSPACE_MB"] = "1"
            scan(2, 64, 600, 16, "variable", torch.float32)
            os.environ.pop("SHAMMIE_SCAN_WORKSPACE_MB")
    torch.use_deterministic_algorithms(False)
if wants("ssd"):
    for dtype in dtypes(torch.float32, torch.bfloat16, torch.float64):
        # Mamba-2 scan (batch, L, heads, headdim, groups, N): tails of tiles and of the 128-step intervals,
        # N > 32 across warps, N = 256, one row per head; with z, D per row, an initial state, final-state grads
        for batch, L, H, P, G, N in ((2, 37, 4, 3, 2, 16), (1, 130, 2, 5, 1, 64), (1, 40, 2, 2, 2, 256), (2, 9, 3, 1, 3, 4)):
            act = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, requires_grad=True)
            f32 = lambda *s: torch.randn(*s, device="cuda", requires_grad=True)
            out, final = shammie.mamba_chunk_scan_combined(
                act(batch, L, H, P), act(batch, L, H), (-torch.rand(H, device="cuda")).requires_grad_(),
                act(batch, L, G, N), act(batch, L, G, N), 64, D=f32(H, P), z=act(batch, L, H, P), dt_bias=f32(H),
                initial_states=f32(batch, H, P, N), dt_softplus=True, return_final_states=True,
                seq_idx=(torch.arange(L, device="cuda") >= L // 3).int().expand(batch, L))   # two packed sequences
            (out.float().sum() + final.sum()).backward()
        # Each packed sequence's final state (cu_seqlens, batch 1): ends inside and at the end of tiles, an
        # empty sequence, gradients through the states
        L, H, P, G, N = 70, 2, 3, 1, 16
        x = torch.randn(1, L, H, P, device="cuda", dtype=dtype, requires_grad=True)
        out, varlen = shammie.mamba_chunk_scan_combined(
            x, torch.randn(1, L, H, device="cuda", dtype=dtype), -torch.rand(H, device="cuda"),
            torch.randn(1, L, G, N, device="cuda", dtype=dtype), torch.randn(1, L, G, N, device="cuda", dtype=dtype),
            64, dt_softplus=True, cu_seqlens=torch.tensor([0, 5, 32, 32, 70], device="cuda"), return_varlen_states=True)
        (out.float().sum() + varlen.sum()).backward()
for impl in IMPLS if wants("frechet") else ():   # both implementations (fused kernels, GEMMs)
    os.environ["SHAMMIE_FRECHET_IMPL"] = impl
    for dtype in dtypes(torch.float32, torch.bfloat16, torch.float16, torch.float64):
        # (B, K, N, k): partial row and label tiles, K not a multiple of the K step, many label groups, k > 1
        for batch, K, N, k in ((1, 7, 50, 1), (70, 33, 900, 3), (129, 64, 4097, 5), (3, 1, 40, 2)):
            probs = torch.rand(batch, K, device="cuda", dtype=dtype)
            sq = torch.rand(K, N, device="cuda", dtype=dtype)
            shammie.frechet_topk(probs, sq, k)
            shammie.frechet_topk(probs, sq, k, candidates=torch.rand(N, device="cuda") < 0.5)
            shammie.gemm_bias_topk(probs, sq, torch.randn(N, device="cuda", dtype=dtype), k,
                                   torch.arange(0, N, 3, device="cuda"), True)
if wants("tree"):
    if importlib.util.find_spec("scipy") is not None:  # TreeMetric builds its plan with scipy
        from shammie.loki import TreeMetric

        # a random tree of 300 nodes, 1 to 40 observed, batch tails of the 128-thread blocks, k = 1 and 5
        gen = torch.Generator().manual_seed(0)
        parent = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, 300)]
        metric = TreeMetric(parent, torch.rand(300, generator=gen).numpy() + 0.1)
        for dtype in dtypes(torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for batch, K, k in ((1, 1, 1), (130, 7, 5), (37, 40, 1)):
                observed = torch.randperm(300, generator=gen)[:K]
                metric.frechet_topk(torch.rand(batch, K, device="cuda").to(dtype) + 0.01, observed, k)
torch.cuda.synchronize()
print("sanitizer cases ran")
