"""The op families `shammie bench` knows; each module has `cases(device, dtypes) -> [Case]`."""

from __future__ import annotations

import importlib

OP_FAMILIES = {
    "monarch": "shammie.benchmarks.monarch",
    "more": "shammie.benchmarks.more",
    "causal_conv1d": "shammie.benchmarks.causal_conv1d",
    "selective_scan": "shammie.benchmarks.selective_scan",
    "selective_scan_full": "shammie.benchmarks.selective_scan_full",
    "mamba2_scan": "shammie.benchmarks.mamba2_scan",
    "mamba2_scan_full": "shammie.benchmarks.mamba2_scan_full",
    "frechet": "shammie.benchmarks.frechet",
    "loki": "shammie.benchmarks.loki",
    "manticore": "shammie.benchmarks.manticore",
}

# Families that take minutes (their peers are slow at the full shape): run only when named.
OPT_IN = {"selective_scan_full", "mamba2_scan_full"}


def default_ops() -> list[str]:
    return [op for op in OP_FAMILIES if op not in OPT_IN]


def cases(ops, device, dtypes=None):
    out = []
    for op in ops:
        out.extend(importlib.import_module(OP_FAMILIES[op]).cases(device, dtypes))
    return out
