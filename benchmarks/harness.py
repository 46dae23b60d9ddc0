"""Timing and reporting shared by the benchmarks: one Case per (op, shape, dtype), timed side by
side with its peer in the same process, forward and forward+backward.

CPU times come from torch.utils.benchmark (median of blocked runs), in CPU_ROUNDS rounds that
alternate ours, the peer and the baseline, each side keeping its best round: on a shared machine a
burst of load then hits both sides rather than whichever was running. CUDA times from
triton.testing.do_bench (median, after warm-up), or CUDA events when triton is missing.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

import torch
import torch.utils.benchmark as torch_benchmark


@dataclasses.dataclass
class Case:
    op: str
    shape: str                       # named after the model or adapter it comes from
    dtype: torch.dtype
    make_inputs: Callable[[torch.device], list[torch.Tensor]]
    ours: Callable[..., torch.Tensor]
    peer: Callable[..., torch.Tensor]
    peer_name: str
    bytes_forward: int               # bytes the forward must move at least (read inputs, write output)
    bytes_backward: int              # likewise for the backward alone
    flops_forward: float
    flops_backward: float
    baseline: Callable[..., torch.Tensor] | None = None   # e.g. the frozen base layer under an adapter
    baseline_name: str = ""
    backward: bool = True                                  # False for ops without autograd (decode steps)
    memory: bool = False                                   # also report each side's peak extra memory (forward)


CPU_ROUNDS = 3


def median_seconds(fn: Callable[[], object], device: torch.device, min_run_time: float, warm_up: bool = True) -> float:
    if device.type == "cuda":
        try:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=25, rep=max(50, int(min_run_time * 1000))) / 1e3
        except ImportError:
            return _cuda_event_seconds(fn)
    if warm_up:
        fn()
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _cuda_event_seconds(fn: Callable[[], object], reps: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated through torch's allocator during one call, beyond what was live before (the
    output included; library-internal buffers such as MKL's GEMM packing are not seen, on either side)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for the backward of fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _forward_and_backward(fn, inputs, grad):
    # token ids and other integer inputs cannot require grad: they stay plain inputs
    leaves = [t.detach().requires_grad_() if t.is_floating_point() or t.is_complex() else t for t in inputs]

    def run():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves).backward(grad)

    return run


def measure(case: Case, device: torch.device, min_run_time: float) -> dict:
    inputs = case.make_inputs(device)
    with torch.no_grad():
        grad = torch.randn_like(case.ours(*inputs)) if case.backward else None
    row = {"op": case.op, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""),
           "device": str(device), "peer": case.peer_name}
    timed = [("ours", case.ours), ("peer", case.peer)] + ([("base", case.baseline)] if case.baseline else [])
    rounds = 1 if device.type == "cuda" else CPU_ROUNDS
    for round_ in range(rounds):
        for label, fn in timed:
            first = round_ == 0   # later rounds need no warm-up
            with torch.no_grad():
                fwd = median_seconds(lambda: fn(*inputs), device, min_run_time / rounds, first)
            fwdbwd = (median_seconds(_forward_and_backward(fn, inputs, grad), device, min_run_time / rounds, first)
                      if case.backward else float("nan"))
            if round_ == 0 or fwd < row[f"{label}_fwd_s"]:
                row[f"{label}_fwd_s"] = fwd
            if round_ == 0 or fwdbwd < row[f"{label}_fwdbwd_s"]:
                row[f"{label}_fwdbwd_s"] = fwdbwd
    row["speedup_fwd"] = row["peer_fwd_s"] / row["ours_fwd_s"]
    if case.memory:
        for label, fn in timed[:2]:
            with torch.no_grad():
                row[f"{label}_extra_bytes"] = peak_extra_bytes(lambda: fn(*inputs), device)
    row["speedup_fwdbwd"] = row["peer_fwdbwd_s"] / row["ours_fwdbwd_s"]
    if not case.backward:   # rates from the forward alone
        row["ours_fwd_GBps"] = case.bytes_forward / row["ours_fwd_s"] / 1e9
        row["ours_fwdbwd_GBps"] = row["ours_fwd_GBps"]
        row["ours_fwdbwd_GFLOPs"] = case.flops_forward / row["ours_fwd_s"] / 1e9
        return row
    total_bytes = case.bytes_forward + case.bytes_backward
    row["ours_fwd_GBps"] = case.bytes_forward / row["ours_fwd_s"] / 1e9
    row["ours_fwdbwd_GBps"] = total_bytes / row["ours_fwdbwd_s"] / 1e9
    row["ours_fwd_GFLOPs"] = case.flops_forward / row["ours_fwd_s"] / 1e9
    row["ours_fwdbwd_GFLOPs"] = (case.flops_forward + case.flops_backward) / row["ours_fwdbwd_s"] / 1e9
    if case.baseline:
        row["baseline"] = case.baseline_name
        for label in ("ours", "peer"):
            row[f"{label}_overhead_fwdbwd_s"] = row[f"{label}_fwdbwd_s"] - row["base_fwdbwd_s"]
    return row


def format_table(rows: Sequence[dict]) -> str:
    header = ["op", "shape", "dtype", "fwd ms", "peer fwd ms", "fwd x",
              "fwd+bwd ms", "peer fwd+bwd ms", "fwd+bwd x", "GB/s", "GFLOP/s"]
    num = lambda v, scale=1.0, fmt=".3f": "-" if v != v else f"{v * scale:{fmt}}"   # NaN: not measured
    lines = [[r["op"], r["shape"], r["dtype"],
              num(r["ours_fwd_s"], 1e3), num(r["peer_fwd_s"], 1e3), num(r["speedup_fwd"], fmt=".2f"),
              num(r["ours_fwdbwd_s"], 1e3), num(r["peer_fwdbwd_s"], 1e3), num(r["speedup_fwdbwd"], fmt=".2f"),
              num(r["ours_fwdbwd_GBps"], fmt=".1f"), num(r["ours_fwdbwd_GFLOPs"], fmt=".1f")] for r in rows]
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [fmt(header), fmt(["-" * w for w in widths])]
    out += [fmt(l) for l in lines]
    for peer in dict.fromkeys(r["peer"] for r in rows):
        out.append(f"peer: {peer}")
    if rows:
        out.append("x = peer time / shammie time; GB/s and GFLOP/s are shammie's fwd+bwd (fwd for ops without "
                   "a backward), from the minimum bytes moved and the useful flops.")
    with_memory = [r for r in rows if "ours_extra_bytes" in r]
    if with_memory:
        out.append("")
        out.append("peak extra memory of one forward (allocated through torch, outputs included):")
        for r in with_memory:
            ours, peer = r["ours_extra_bytes"], r["peer_extra_bytes"]
            out.append(f"  {r['op']} {r['shape']} {r['dtype']}: shammie {ours / 2**20:.2f} MiB, peer {peer / 2**20:.2f} MiB"
                       f" ({100 * ours / max(peer, 1):.1f}% of the peer's)")
    with_base = [r for r in rows if "baseline" in r]
    if with_base:
        out.append("")
        out.append("overhead over the base layer, fwd+bwd (layer time - base time, each the best of a few rounds; when the "
                   "base takes seconds, as on CPU, the difference is within noise, and the adapter rows above measure "
                   "the adapter's own work):")
        for r in with_base:
            base = r["base_fwdbwd_s"]
            out.append(f"  {r['shape']} {r['dtype']}: base {base * 1e3:.2f} ms; shammie {r['ours_overhead_fwdbwd_s'] * 1e3:+.2f} ms "
                       f"({100 * r['ours_overhead_fwdbwd_s'] / base:+.1f}%); peer {r['peer_overhead_fwdbwd_s'] * 1e3:+.2f} ms "
                       f"({100 * r['peer_overhead_fwdbwd_s'] / base:+.1f}%)")
    return "\n".join(out)


def write_json(rows: Sequence[dict], path: str, meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": list(rows)}, f, indent=2)
