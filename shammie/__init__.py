"""Shammie: hand-written C++/CUDA kernels for Monarch products, selective scans and Fréchet-mean
search, registered as PyTorch custom ops (torch.ops.shammie.*)."""

from shammie._loader import load_extension as _load_extension
from shammie.version import __version__

_C = _load_extension()

from shammie.causal_conv1d import causal_conv1d_fn, causal_conv1d_update  # noqa: E402
from shammie.causal_conv1d_varlen import causal_conv1d_varlen_states  # noqa: E402
from shammie.frechet import frechet_topk, gemm_bias_topk  # noqa: E402
from shammie.mamba2 import mamba_chunk_scan_combined  # noqa: E402
from shammie.mamba2_split import mamba_split_conv1d_scan_combined  # noqa: E402
from shammie.mamba_inner import mamba_inner_fn  # noqa: E402
from shammie.monarch import blockdiag_butterfly_multiply  # noqa: E402
from shammie.selective_scan import selective_scan_fn, selective_state_update  # noqa: E402
from shammie.tree_frechet import tree_frechet_topk  # noqa: E402


def build_info() -> dict:
    """What the extension was built with, plus what runs now."""
    import torch

    info = dict(_C.build_info)
    info["running_torch_version"] = torch.__version__
    info["cpu_kernels"] = _C.cpu_isa()
    info["cpu_bf16_dot"] = _C.cpu_bf16_dot()
    info["cuda_available"] = torch.cuda.is_available()
    return info


__all__ = ["__version__", "blockdiag_butterfly_multiply", "build_info", "causal_conv1d_fn", "causal_conv1d_update",
           "causal_conv1d_varlen_states",
           "frechet_topk", "gemm_bias_topk",
           "mamba_chunk_scan_combined", "mamba_inner_fn", "mamba_split_conv1d_scan_combined", "selective_scan_fn", "selective_state_update", "tree_frechet_topk"]
