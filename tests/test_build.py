"""The extension records what it was built with, and a torch mismatch is a plain error."""

import pytest
import torch

import shammie
from shammie import _loader


def test_build_info_describes_this_build():
    info = shammie.build_info()
    assert info["shammie_version"] == shammie.__version__
    assert info["torch_version"] == torch.__version__ == info["running_torch_version"]
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"]


def test_torch_mismatch_says_so_and_how_to_rebuild(monkeypatch):
    recorded = dict(_loader.recorded_build_info(), torch_version="1.0.0+elsewhere")
    monkeypatch.setattr(_loader, "recorded_build_info", lambda: recorded)
    with pytest.raises(_loader.ShammieBuildError, match=r"built for torch 1\.0\.0\+elsewhere but torch .* is installed.*pip install"):
        _loader.load_extension()


def test_ops_are_registered_under_torch_ops():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("check", Path(__file__).resolve().parents[1] / ".ci" / "check_cuda_kernels.py")
    ops = spec.loader.get_source("check")   # the op list CI checks for CUDA kernels
    names = [line.strip().strip('",') for line in ops.split("OPS = [")[1].split("]")[0].splitlines() if line.strip()]
    assert "causal_conv1d" in names and "blockdiag_butterfly_multiply" in names
    for name in names:
        assert getattr(torch.ops.shammie, name).default is not None
        for key in ("CPU",) + (("CUDA",) if shammie.build_info()["cuda"] else ()):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"shammie::{name}", key), (name, key)
