"""Loads the compiled extension shammie._C, or says plainly why it can't.

The build writes _build_info.json beside the module (CMakeLists.txt). Reading it before the
module loads lets a torch mismatch be reported as such, never as a bare "undefined symbol".
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
REBUILD_HINT = (
    "Rebuild shammie against the torch you run: `pip install --no-build-isolation -e .` "
    "from the source tree (see README.md, 'Building')."
)


class ShammieBuildError(ImportError):
    """shammie's extension is missing or was built for another torch."""


def recorded_build_info() -> dict:
    path = _PACKAGE_DIR / "_build_info.json"
    if not path.exists():
        raise ShammieBuildError(f"shammie's compiled extension is not built ({path} is missing). {REBUILD_HINT}")
    return json.loads(path.read_text())


def load_extension():
    info = recorded_build_info()
    built, running = info["torch_version"], torch.__version__
    if built != running:   # "2.14.1+cu130" and "2.14.1" are different builds: the whole string counts
        raise ShammieBuildError(
            f"shammie was built for torch {built} but torch {running} is installed; "
            f"its compiled ops only load under the torch they were built with. {REBUILD_HINT}"
        )
    try:
        return importlib.import_module("shammie._C")
    except ImportError as error:
        raise ShammieBuildError(
            f"shammie's extension failed to load ({error}). It records a build for torch {built} "
            f"(CUDA: {info['cuda']}), and torch {running} is installed. {REBUILD_HINT}"
        ) from error
