"""Build the CPU emulation of shammie's CUDA kernels and load it over shammie's CPU kernels.

    python tests/cuda_emulation/build.py            # build (about 5 minutes on 2 cores) and load

The rewritten sources and the build go to .emu-build/ at the repository root (ignored by git).
SHAMMIE_EMU_ASAN=1 builds with AddressSanitizer (run Python with libasan preloaded then).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD = ROOT / ".emu-build"

sys.path.insert(0, str(HERE))
from rewrite import rewrite_tree  # noqa: E402

# The CPU kernels and the Python module are not part of the emulation.
SKIP = ("_cpu_kernels.cpp", "extension.cpp")


def build(verbose: bool = False):
    import importlib

    from torch.utils import cpp_extension

    importlib.import_module("shammie")   # its library first: the emulation's registrations replace its CPU kernels

    units = [u for u in rewrite_tree(ROOT / "csrc", BUILD) if not u.name.endswith(SKIP)]
    flags = ["-O1", "-g0", "-std=c++20", "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-unused-variable"]
    ldflags = []
    if os.environ.get("SHAMMIE_EMU_ASAN") == "1":
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    (BUILD / "obj").mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="shammie_emu", sources=[str(u) for u in units], extra_cflags=flags, extra_ldflags=ldflags,
        extra_include_paths=[str(BUILD / "csrc"), str(HERE)], build_directory=str(BUILD / "obj"),
        is_python_module=False, verbose=verbose)


if __name__ == "__main__":
    build(verbose=True)
