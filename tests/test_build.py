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
    assert torch.ops.shammie.blockdiag_butterfly_multiply.default is not None
    for key in ("CPU",) + (("CUDA",) if shammie.build_info()["cuda"] else ()):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("shammie::blockdiag_butterfly_multiply", key)
