"""Builds shammie by driving CMake (CMakeLists.txt is the one build definition).

`pip install --no-build-isolation -e .` builds shammie/_C in the source tree, exactly as
`cmake -S . -B build && cmake --build build` does. Build controls are environment variables:
SHAMMIE_CUDA=0|1, TORCH_CUDA_ARCH_LIST, CMAKE_CUDA_ARCHITECTURES, MAX_JOBS (see CMakeLists.txt).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _tool(name: str) -> str | None:
    """A build tool from the running Python's environment first (pip's cmake 4.x, ninja), then PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    return shutil.which(name)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(os.environ.get("SHAMMIE_BUILD_DIR", ROOT / "build"))
        source_package = ROOT / "shammie"
        cmake = _tool("cmake") or "cmake"
        ninja = _tool("ninja")
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DSHAMMIE_OUTPUT_DIR={source_package}",
        ]
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        # The module is built into the source package; a non-editable build copies it out.
        built = source_package / target.name
        if built.resolve() != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, target)
            shutil.copy2(source_package / "_build_info.json", target.parent / "_build_info.json")


setup(
    # Every subpackage of shammie/ (more, reference, integrations, ...) plus benchmarks/ as shammie.benchmarks.
    packages=["shammie", *(f"shammie.{name}" for name in find_packages("shammie")), "shammie.benchmarks"],
    package_dir={"shammie": "shammie", "shammie.benchmarks": "benchmarks"},
    ext_modules=[CMakeExtension("shammie._C")],
    cmdclass={"build_ext": CMakeBuild},
)
