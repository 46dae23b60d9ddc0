"""mamba_chunk_scan_combined at L 2048 (batch 2, Mamba2-130M's layer) against the same peer as
benchmarks/mamba2_scan.py. Takes a minute on a small CPU: opt-in (`shammie bench --ops mamba2_scan_full`)."""

from __future__ import annotations

import torch

from shammie.benchmarks.mamba2_scan import FULL_SHAPE
from shammie.benchmarks.mamba2_scan import cases as scan_cases


def cases(device: torch.device, dtypes=None):
    return scan_cases(device, dtypes, shapes=[FULL_SHAPE])
