"""The device's measured copy bandwidth: the ceiling the memory-bound benchmarks are held to."""

import sys

import torch

device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
n = (1 << 30) // 4 if device == "cuda" else (1 << 26) // 4
src = torch.randn(n, device=device)
dst = torch.empty_like(src)
if device == "cuda":
    import triton.testing

    seconds = triton.testing.do_bench(lambda: dst.copy_(src)) / 1e3
else:
    import torch.utils.benchmark as benchmark

    seconds = benchmark.Timer("dst.copy_(src)", globals={"dst": dst, "src": src}).blocked_autorange(min_run_time=1).median
print(f"copy bandwidth ({device}): {2 * src.numel() * 4 / seconds / 1e9:.1f} GB/s (read + write of {src.numel() * 4 / 2**20:.0f} MiB)")
