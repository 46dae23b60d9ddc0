"""`shammie` command line: `shammie bench` (the benchmark table) and `shammie info` (build info)."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys


def _machine(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return f"{model}, {torch.get_num_threads()} threads"


def _writable(path: str) -> bool:
    """Whether `path` can be written, found before the (slow) measurements rather than after the first one."""
    existed = os.path.exists(path)
    try:
        open(path, "a").close()  # appending nothing leaves an existing file as it was
    except OSError as e:
        print(f"shammie bench: --json {path}: cannot write there ({e.strerror})", file=sys.stderr)
        return False
    if not existed:
        os.remove(path)
    return True


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def bench(args: argparse.Namespace) -> int:
    import torch

    import shammie
    from shammie.benchmarks import registry
    from shammie.benchmarks.harness import format_table, measure, write_json

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("shammie bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    ops = args.ops or registry.default_ops()
    unknown = sorted(set(ops) - set(registry.OP_FAMILIES))
    if unknown:
        print(f"shammie bench: unknown op(s) {unknown}; known: {sorted(registry.OP_FAMILIES)}", file=sys.stderr)
        return 2
    if args.json and not _writable(args.json):
        return 2
    dtypes = [getattr(torch, name) for name in args.dtype] if args.dtype else None
    meta = {
        "command": " ".join(["shammie"] + sys.argv[1:]),
        "machine": _machine(device.type),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "shammie": shammie.build_info(),
    }
    print(f"# {meta['command']}\n# {meta['machine']}; torch {meta['torch']}; {meta['date']}", flush=True)
    rows = []
    for case in registry.cases(ops, device, dtypes):
        row = measure(case, device, args.min_run_time)
        rows.append(row)
        both = "" if row["speedup_fwdbwd"] != row["speedup_fwdbwd"] else f", fwd+bwd {row['speedup_fwdbwd']:.2f}x"
        print(f"  measured {row['op']} {row['shape']} {row['dtype']}: fwd {row['speedup_fwd']:.2f}x{both}",
              file=sys.stderr, flush=True)
        if args.json:   # after every row, so a run cut short by a time limit keeps what it measured
            write_json(rows, args.json, meta)
    print(format_table(rows))
    return 0


# Rejects an argument inside the extension, so the C++ exception unwinds through its frames.
_ERROR_PROBE = """
import torch, shammie
try:
    torch.ops.shammie.blockdiag_butterfly_multiply(torch.ones(2, 3), torch.ones(1, 1, 1), torch.ones(1, 1, 1))
except ValueError:
    print("ok")
"""


def cpp_errors_work() -> str:
    """'ok' when an argument error raised in the extension reaches Python. A toolchain that breaks
    C++ unwinding through the module (seen once, benchmarks/RESULTS.md) makes every rejected call
    crash the process instead; this finds out in a child process."""
    import subprocess

    run = subprocess.run([sys.executable, "-c", _ERROR_PROBE], capture_output=True, text=True, timeout=120)
    if run.returncode == 0 and run.stdout.strip() == "ok":
        return "ok"
    return f"BROKEN (exit {run.returncode}): rebuild shammie; see README's GPU-cluster build"


def info(_args: argparse.Namespace) -> int:
    import shammie

    print(json.dumps({**shammie.build_info(), "cpp_errors": cpp_errors_work()}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shammie", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time shammie's ops against their best peers")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--ops", nargs="+", help="op families to run (default: all)")
    b.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU; bfloat16 and float32 on CUDA")
    b.add_argument("--json", help="also write the rows and the machine's description to this file")
    b.add_argument("--min-run-time", type=_positive_seconds, default=0.5, help="seconds of timing per measurement (CPU)")
    b.set_defaults(run=bench)
    i = sub.add_parser("info", help="print what shammie was built with")
    i.set_defaults(run=info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
