"""Host time per call: what a step pays on the CPU before any kernel work, on shapes so small that
the kernels cost nothing. On a GPU this is the floor under every launch; for MoRe's few-MFLOP adapters
it can be most of the step, and a Mamba layer pays it for its conv and its scan. Side by side with peft's LoRA layer (the peer) and the frozen nn.Linear.

    python -m shammie.benchmarks.host_overhead [--device cpu|cuda] [--calls 3000] [--repeats 5]

Each row: best of `repeats` loops of `calls` calls, µs per call, one thread. On CUDA each loop ends
with a synchronize, so a row is the larger of the host's and the device's time per call.
"""

from __future__ import annotations

import argparse
import time

import torch

import shammie
from shammie.benchmarks import more as more_cases
from shammie.more.layer import MoReLinear


def per_call_us(fn, calls: int, repeats: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(min(calls, 200)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def train_step(layer, x):
    return lambda: layer(x).sum().backward()


def rows(calls: int, repeats: int, device: str):
    width = 64
    leaf = lambda *shape: torch.randn(*shape, device=device, requires_grad=True)
    x, w1, w2 = leaf(2, width), leaf(4, 4, width // 4), leaf(4, width // 4, 4)
    more = MoReLinear(torch.nn.Linear(width, width, device=device))
    more.base_layer.bias.requires_grad_(False)   # frozen, as peft freezes the base layer's bias
    frozen = torch.nn.Linear(width, width, device=device).requires_grad_(False)
    time_it = lambda fn: per_call_us(fn, calls, repeats, device)

    yield "x.sum().backward() alone (the floor of every train step)", time_it(lambda: x.sum().backward())
    yield "blockdiag_butterfly_multiply fwd+bwd", time_it(
        lambda: shammie.blockdiag_butterfly_multiply(x, w1, w2).sum().backward())
    yield "frozen nn.Linear fwd+bwd", time_it(train_step(frozen, x))
    yield "MoReLinear (4 blocks, rank 4) fwd+bwd", time_it(train_step(more, x))
    conv_x, conv_w = leaf(1, 16, 8), leaf(16, 4)
    yield "causal_conv1d fwd+bwd", time_it(
        lambda: shammie.causal_conv1d_fn(conv_x, conv_w, activation="silu").sum().backward())
    scan = [leaf(1, 16, 8), leaf(1, 16, 8), leaf(16, 4), leaf(1, 4, 8), leaf(1, 4, 8)]
    yield "selective_scan_fn fwd+bwd", time_it(lambda: shammie.selective_scan_fn(*scan).sum().backward())
    # peft's LoRA layer (r = 4) on one nn.Linear, the peer, where peft is installed.
    lora = more_cases.lora_layer(torch.nn.Linear(width, width), 4).to(device) if more_cases.peft else None
    if lora is not None:
        yield "peft LoRA layer (r = 4) fwd+bwd", time_it(train_step(lora, x))
    with torch.no_grad():
        yield "MoReLinear forward, no_grad", time_it(lambda: more(x))
        if lora is not None:
            yield "peft LoRA layer forward, no_grad", time_it(lambda: lora(x))
    step_x, state, dt = (torch.randn(1, 16, device=device), torch.zeros(1, 16, 4, device=device),
                         torch.rand(1, 16, device=device))
    A, B, C = -torch.rand(16, 4, device=device), torch.randn(1, 4, device=device), torch.randn(1, 4, device=device)
    yield "selective_state_update (decode step)", time_it(
        lambda: shammie.selective_state_update(state, step_x, dt, A, B, C, dt_softplus=True))
    conv_state, weight = torch.zeros(1, 16, 4, device=device), torch.randn(16, 4, device=device)
    yield "causal_conv1d_update (decode step)", time_it(
        lambda: shammie.causal_conv1d_update(step_x, conv_state, weight, None, "silu"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# host time per call on {args.device}, torch {torch.__version__}, one thread")
    for name, us in rows(args.calls, args.repeats, args.device):
        print(f"{name:60s} {us:8.1f} µs")


if __name__ == "__main__":
    main()
