"""selective_scan_fn at the issue's Mamba-130M layer shape (batch 2, dim 1536, L 2048, N 16, fp32 on
CPU) against both of HF transformers' torch paths: its Python loop over L (forward) and mambapy's
parallel scan (forward and forward+backward). Takes minutes on a small CPU: opt-in
(`shammie bench --ops selective_scan_full`)."""

from __future__ import annotations

import torch

from shammie.benchmarks.selective_scan import FULL_SHAPE, scan_cases


def cases(device: torch.device, dtypes=None):
    return scan_cases(device, dtypes, shapes=[FULL_SHAPE], peers=("loop", "mambapy"))
