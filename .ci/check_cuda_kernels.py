"""After a CUDA build on a GPU-less machine: the module imports, says it was built with CUDA,
and every public op (and its backward) has a CUDA kernel registered."""

import torch

import shammie

OPS = [
    "blockdiag_butterfly_multiply",
    "blockdiag_butterfly_multiply_backward",
    "causal_conv1d",
    "causal_conv1d_backward",
    "causal_conv1d_update",
    "selective_state_update",
    "selective_scan",
    "selective_scan_backward",
    "ssd_scan",
    "ssd_scan_backward",
    "frechet_topk",
    "gemm_bias_topk",
    "tree_frechet_topk",
]

info = shammie.build_info()
print(info)
assert info["cuda"], "the extension was not built with CUDA"
for op in OPS:
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"shammie::{op}", key), f"shammie::{op} has no {key} kernel"
    print(f"shammie::{op}: CPU and CUDA kernels registered")
