"""The op families `shammie bench` knows; each module has `cases(device, dtypes) -> [Case]`."""

from __future__ import annotations

import importlib

OP_FAMILIES = {
    "monarch": "shammie.benchmarks.monarch",
    "more": "shammie.benchmarks.more",
    "causal_conv1d": "shammie.benchmarks.causal_conv1d",
    "selective_scan": "shammie.benchmarks.selective_scan",
}


def default_ops() -> list[str]:
    return list(OP_FAMILIES)


def cases(ops, device, dtypes=None):
    out = []
    for op in ops:
        out.extend(importlib.import_module(OP_FAMILIES[op]).cases(device, dtypes))
    return out
