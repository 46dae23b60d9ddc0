"""Where a MoRe layer's training step spends its time: wall time per step against the time the device
is busy in kernels, and the kernels themselves, beside peft's LoRA layer and the frozen base layer.
Stop 13 measured the adapter far over its ≤ 15% overhead target on an H200 without knowing whether
the host (Python, dispatch, launches) or the kernels were the cost; this answers that in one run.

    python -m shammie.benchmarks.more_profile [--device cuda] [--dtype bfloat16] [--tokens 2048] [--steps 20]

Llama-7B shapes (benchmarks/more.py): q/k/v 4096→4096 and up 4096→11008, MoRe 4 blocks of rank 4,
with each Monarch implementation (SHAMMIE_MONARCH_IMPL: auto, gemm, dense, kernel).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from shammie.benchmarks import more as more_cases
from shammie.benchmarks.impl_compare import MONARCH_IMPLS
from shammie.more import MoReLinear


def layers(n_in: int, n_out: int, dtype: torch.dtype, device: str) -> dict[str, torch.nn.Module]:
    base = torch.nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    more = MoReLinear(base, nblocks=4, blk_r=4).to(device=device, dtype=dtype)
    with torch.no_grad():
        more.R.normal_(0, 0.01)
    out = {"frozen base nn.Linear": base, "MoReLinear": more}
    if more_cases.peft is not None:   # the peer, where peft is installed
        rank = round(more.adapter_parameters / (n_in + n_out))
        out[f"peft LoRA (rank {rank})"] = more_cases.lora_layer(base, rank).to(device=device, dtype=dtype)
    return out


def profile_step(layer, x, grad, steps: int, device: str):
    """(wall ms per step, device-busy ms per step, kernels sorted by time)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step = lambda: layer(x).backward(grad)
    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = (time.perf_counter() - start) / steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    if device == "cuda":   # kernels only: device events that are not CPU ops
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        timing = lambda e: e.self_device_time_total
    else:                  # on CPU the ops' own time stands in for the kernels
        kernels = list(prof.key_averages())
        timing = lambda e: e.self_cpu_time_total
    kernels = sorted(((timing(e) / steps / 1e3, e.count // steps, e.key) for e in kernels), reverse=True)
    busy = sum(ms for ms, _, _ in kernels)
    return wall, busy, kernels


@contextlib.contextmanager
def monarch_impl(impl: str):
    """SHAMMIE_MONARCH_IMPL for the calls inside (the op reads it on every call)."""
    before = os.environ.get("SHAMMIE_MONARCH_IMPL")
    os.environ["SHAMMIE_MONARCH_IMPL"] = impl
    try:
        yield
    finally:
        if before is None:
            del os.environ["SHAMMIE_MONARCH_IMPL"]
        else:
            os.environ["SHAMMIE_MONARCH_IMPL"] = before


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=8, help="kernels listed per layer")
    parser.add_argument("--impls", nargs="+", default=["auto", *MONARCH_IMPLS],
                        help="Monarch implementations to profile MoReLinear with")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    busy_in = "busy in kernels" if args.device == "cuda" else "in ops (self CPU time)"
    print(f"# MoRe layer step (fwd+bwd) on {args.device}, {args.dtype}, {args.tokens} tokens, torch {torch.__version__}")
    for name, n_in, n_out in more_cases.SHAPES:
        x = torch.randn(args.tokens, n_in, device=args.device, dtype=dtype, requires_grad=True)
        grad = torch.randn(args.tokens, n_out, device=args.device, dtype=dtype)
        for label, layer in layers(n_in, n_out, dtype, args.device).items():
            for impl in args.impls if label == "MoReLinear" else ["auto"]:
                with monarch_impl(impl):
                    wall, busy, kernels = profile_step(layer, x, grad, args.steps, args.device)
                shown = f"{label} [{impl}]" if label == "MoReLinear" else label
                print(f"{name} | {shown}: wall {wall:.3f} ms/step, {busy_in} {busy:.3f} ms/step")
                for ms, count, key in kernels[:args.top]:
                    print(f"    {ms:8.4f} ms  {count:3d}×  {key[:110]}")


if __name__ == "__main__":
    main()
