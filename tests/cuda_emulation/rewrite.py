"""Turn shammie's CUDA sources into plain C++ for the CPU emulation in emu_runtime.h.

Each file of csrc/ is copied with these changes (.cu files become .cpp):
- CUDA headers are replaced by emu_runtime.h;
- `kernel<<<grid, block, smem, stream>>>(args);` becomes
  `emu::launch(emu::config(...), [&](auto&... a) { kernel(a...); }, args);`;
- `extern __shared__ T name[];` points at the launch's dynamic shared memory, and a static
  `__shared__` array becomes a function-level static that is filled with 0xFF in each block;
- the CUDA kernels are registered under the CPU key and the schema and CPU registrations dropped:
  loaded after shammie's own library, the emulation replaces its CPU kernels, so shammie's ops on CPU
  tensors run the emulated CUDA kernels; `.is_cuda()` reads true, so the front ends take their CUDA
  paths (and cuBLAS's fp32-output mm of fp16/bf16 inputs casts first).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CUDA_INCLUDE = re.compile(r'#include <(c10/cuda/[^>]+|ATen/cuda/[^>]+|cuda_runtime\.h|cuda_fp16\.h|cuda_bf16\.h|mma\.h|cuda/std/limits)>')
DYNAMIC_SHARED = re.compile(r'extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(.+?)\s+(\w+)\s*\[\s*\]\s*;')
STATIC_SHARED = re.compile(r'__shared__\s+(?:__align__\((\d+)\)\s+)?([^;]+?)\s+(\w+)((?:\s*\[[^\];]*\])*)\s*;')


def _matching(text: str, i: int, open_: str, close: str) -> int:
    """Index of the bracket closing the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_:
            depth += 1
        elif text[j] == close:
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced {open_}{close} at {i}")


def rewrite_launches(text: str) -> str:
    while (at := text.find("<<<")) >= 0:
        start = max(text.rfind(c, 0, at) for c in ";{}") + 1
        name = text[start:at].strip()
        end_cfg = text.index(">>>", at)
        config = text[at + 3:end_cfg]
        open_args = text.index("(", end_cfg)
        close_args = _matching(text, open_args, "(", ")")
        args = text[open_args + 1:close_args].strip()
        lead = text[start:at][: len(text[start:at]) - len(text[start:at].lstrip())]
        call = f"{lead}emu::launch(emu::config({config}), [&](auto&... a) {{ {name}(a...); }}" + (f", {args})" if args else ")")
        text = text[:start] + call + text[close_args + 1:]
    return text


def _drop_blocks(text: str, pattern: str) -> str:
    while (m := re.search(pattern, text)):
        close = _matching(text, m.end() - 1, "{", "}")
        text = text[:m.start()] + text[close + 1:]
    return text


def rewrite_registrations(text: str) -> str:
    # shammie's own library defines the schemas and the CPU kernels; the emulated CUDA kernels are
    # registered over its CPU kernels, and the front ends take their CUDA paths (every tensor counts
    # as a CUDA tensor).
    text = _drop_blocks(text, r'TORCH_LIBRARY(?:_FRAGMENT)?\(\s*shammie\s*,\s*\w+\s*\)\s*\{')
    text = _drop_blocks(text, r'TORCH_LIBRARY_IMPL\(\s*shammie\s*,\s*(?!CUDA)\w+\s*,\s*\w+\s*\)\s*\{')
    text = re.sub(r'TORCH_LIBRARY_IMPL\(\s*shammie\s*,\s*CUDA\s*,', 'TORCH_LIBRARY_IMPL(shammie, CPU,', text)
    text = text.replace(".is_cuda()", ".is_cpu()")
    # cuBLAS's mm with an fp32 output from fp16/bf16 inputs has no CPU kernel; the products of the
    # inputs are exact in fp32, so the same sums come from casting first.
    return re.sub(r'at::mm\((\w+), (\w+), (\w+)\)', r'at::mm(\1.to(\3), \2.to(\3))', text)


def rewrite_shared(line: str) -> str:
    if line.lstrip().startswith("//"):
        return line
    line = DYNAMIC_SHARED.sub(lambda m: f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(emu::dynamic_shared());", line)
    return STATIC_SHARED.sub(
        lambda m: f"alignas({m[1] or 16}) static {m[2]} {m[3]}{m[4]}; emu::poison_shared(&{m[3]}, sizeof({m[3]}));", line)


def rewrite(text: str) -> str:
    text, n = CUDA_INCLUDE.subn('#include "emu_runtime.h"', text)
    text = "\n".join(rewrite_shared(line) for line in text.split("\n"))
    if "<<<" in text or "__global__" in text or "__shared__" in text:
        if n == 0:
            text = '#include "emu_runtime.h"\n' + text
        text = rewrite_launches(text)
    return rewrite_registrations(text)


def rewrite_tree(csrc: Path, out: Path) -> list[Path]:
    """Rewrites every source under csrc into out/csrc; returns the translation units written."""
    units = []
    for src in sorted(csrc.rglob("*")):
        if not src.is_file() or src.suffix not in (".h", ".cuh", ".cpp", ".cu", ".in"):
            continue
        dest = out / "csrc" / src.relative_to(csrc)
        if src.suffix == ".cu":
            dest = dest.with_suffix(".cpp")
        dest.parent.mkdir(parents=True, exist_ok=True)
        new = rewrite(src.read_text())
        if not dest.exists() or dest.read_text() != new:   # unchanged files keep their time stamps
            dest.write_text(new)
        if dest.suffix == ".cpp":
            units.append(dest)
    return units


if __name__ == "__main__":
    for unit in rewrite_tree(Path(sys.argv[1]), Path(sys.argv[2])):
        print(unit)
