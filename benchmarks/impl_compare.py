"""Each implementation of the ops that have several, side by side in one run: the fused kernels and the
GEMM implementations (SHAMMIE_MONARCH_IMPL = kernel | gemm | dense, SHAMMIE_FRECHET_IMPL = kernel |
gemm, SHAMMIE_SSD_IMPL = kernel | chunked), against the peer of `shammie bench`, at the benchmark's
shapes and (Monarch, Fréchet) at small batches where launches dominate. The numbers behind each op's
`auto` choice (benchmarks/RESULTS.md). On CUDA also the selective scan's default backward against its
deterministic one (under torch.use_deterministic_algorithms), whose cost it shows.
    python -m shammie.benchmarks.impl_compare [--device cuda] [--ops ssd monarch frechet scan]"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os

import torch

import shammie
from shammie.benchmarks import frechet, mamba2_scan, monarch, selective_scan
from shammie.benchmarks.harness import median_seconds
from shammie.reference.monarch import monarch_bmm


def _timed(fn, inputs, device, backward):
    if not backward:
        with torch.no_grad():
            return median_seconds(lambda: fn(*inputs), device, 0.2)
    leaves = [t.detach().requires_grad_() for t in inputs]
    grad = torch.randn_like(fn(*leaves))
    return median_seconds(lambda: torch.autograd.grad(fn(*leaves), leaves, grad), device, 0.2)


MONARCH_IMPLS = ("kernel", "gemm", "dense")
FRECHET_IMPLS = ("kernel", "gemm")
SSD_IMPLS = ("kernel", "chunked")
# The table's columns: each op's implementations by position (kernel; gemm, chunked or deterministic;
# dense).
COLUMNS = ("kernel", "alt", "dense")


@contextlib.contextmanager
def _env(variable, value):
    os.environ[variable] = value
    try:
        yield
    finally:
        os.environ.pop(variable)


@contextlib.contextmanager
def _deterministic(on):
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def _impls(env, names):
    """Each implementation `env` can force, as the context that forces it."""
    return {name: functools.partial(_env, env, name) for name in names}


def _row(label, modes, ours, peer, inputs, device, backward):
    times = {}
    for name, mode in modes.items():
        with mode():
            times[name] = _timed(ours, inputs, device, backward)
    peer_time = _timed(peer, inputs, device, backward)
    cells = [f"{t * 1e3:9.3f}" for t in times.values()] + [f"{'-':>9s}"] * (len(COLUMNS) - len(times))
    columns = " ".join(cells)
    print(f"{label:58s} {columns} {peer_time * 1e3:9.3f} {peer_time / min(times.values()):6.2f}x", flush=True)


def _ssd(device, cuda):
    for dtype in ([torch.bfloat16, torch.float32] if cuda else [torch.float32]):
        for name, batch, L, heads, headdim, N, groups in mamba2_scan.SHAPES[device.type] + [mamba2_scan.FULL_SHAPE]:
            case = mamba2_scan._case(name, batch, L, heads, headdim, N, groups, dtype)
            for backward in (False, True):
                label = f"ssd {'fwd+bwd' if backward else 'fwd'} B={batch} L={L} H={heads} {str(dtype)[6:]}"
                _row(label, _impls("SHAMMIE_SSD_IMPL", SSD_IMPLS), case.ours, case.peer, case.make_inputs(device), device,
                     backward)


def _monarch(device, cuda):
    shapes = monarch.CUDA_SHAPES if cuda else monarch.CPU_SHAPES
    for dtype in ([torch.bfloat16, torch.float32] if cuda else [torch.float32]):
        for name, tokens, n, k, q, l, s, r in shapes:
            for m in (tokens, 64):
                case = monarch._case(name, m, n, k, q, l, s, r, dtype)
                label = f"monarch fwd+bwd {name} M={m} {str(dtype)[6:]}"
                _row(label, _impls("SHAMMIE_MONARCH_IMPL", MONARCH_IMPLS), shammie.blockdiag_butterfly_multiply, monarch_bmm,
                     case.make_inputs(device), device, backward=True)


def _frechet(device, cuda):
    peer = lambda p, d: torch.argmin(p @ d, dim=1)
    for dtype in ([torch.float16, torch.bfloat16, torch.float32] if cuda else [torch.float32]):
        for name, batch, K, N, k in (frechet.CUDA_SHAPES if cuda else frechet.CPU_SHAPES) + [("small", 16, 1000, 20_000, 1)]:
            case = frechet._case(name, batch, K, N, k, dtype, cuda)
            label = f"frechet_topk k={k} {name} B={batch} {str(dtype)[6:]} (peer: argmin(p @ d))"
            _row(label, _impls("SHAMMIE_FRECHET_IMPL", FRECHET_IMPLS), lambda p, d, k=k: shammie.frechet_topk(p, d, k), peer,
                 case.make_inputs(device), device, backward=False)


def _scan(device, cuda):
    if not cuda:
        print("scan: the CPU backward is deterministic in every mode; nothing to compare")
        return
    modes = {"kernel": functools.partial(_deterministic, False), "deterministic": functools.partial(_deterministic, True)}
    for dtype in (torch.bfloat16, torch.float32):
        for shape in selective_scan.SCAN_SHAPES["cuda"] + [selective_scan.FULL_SHAPE]:
            case = selective_scan.scan_cases(device, [dtype], [shape])[-1]   # the peer is mamba_ssm where installed
            label = f"selective_scan fwd+bwd {case.shape} {str(dtype)[6:]}"
            _row(label, modes, case.ours, case.peer, case.make_inputs(device), device, backward=True)


# The newest implementation first, except the deterministic scan: the auto choices matter more when
# device_check.sh's time limit cuts the run short.
FAMILIES = {"ssd": _ssd, "monarch": _monarch, "frechet": _frechet, "scan": _scan}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    print(f"# {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; ms per call")
    print(f"{'case':58s} " + " ".join(f"{name:>9s}" for name in COLUMNS) + f" {'peer':>9s} {'best x':>7s}")
    for family in args.ops:
        FAMILIES[family](device, cuda)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
