"""The CPU emulation of CUDA itself: small kernels, rewritten by rewrite.py and compiled with emu_runtime.h
into a program, must give CUDA's answers, and the bugs it promises to catch must be caught."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rewrite import rewrite  # noqa: E402

KERNELS = r"""
#include <cstdio>
#include <vector>

// Sum of each warp's values by xor shuffles; lanes 0..width-1 of every group get their group's sum.
__global__ void group_sums(const float* in, float* out, int width) {
  float v = in[threadIdx.x];
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  out[threadIdx.x] = v;
}

// Reverses the block's values through shared memory.
__global__ void reverse_block(const float* in, float* out) {
  __shared__ float tile[64];
  tile[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

// The same without the barrier: a race.
__global__ void reverse_block_racy(const float* in, float* out) {
  __shared__ float tile[64];
  tile[threadIdx.x] = in[threadIdx.x];
  out[threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

// Every block overwrites out[0]: the last block to run wins, so the result shows the block order.
__global__ void last_block_wins(float* out) {
  if (threadIdx.x == 0) out[0] = float(blockIdx.x);
}

// Reads shared memory that nobody wrote.
__global__ void read_unwritten(float* out) {
  extern __shared__ float scratch[];
  out[threadIdx.x] = scratch[threadIdx.x];
}

// __syncthreads in a branch that half the block skips while the other half waits in a shuffle.
__global__ void divergent_barrier(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x < 16) __syncthreads();
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Lanes 16.. return before a full-warp shuffle that reads them.
__global__ void shuffle_from_returned(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, float(threadIdx.x), 16);
}

// Two disjoint half-warp masks, as kernels that give each row a group of lanes do.
__global__ void half_warp_masks(float* out) {
  const unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffff0000u;
  float v = threadIdx.x;
  for (int offset = 8; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset, 16);
  out[threadIdx.x] = v;
}

int main(int argc, char** argv) {
  const std::string which = argv[1];
  std::vector<float> in(64), out(64, -1.0f);
  for (int i = 0; i < 64; ++i) in[i] = float(i);
  try {
    if (which == "group_sums") { group_sums<<<1, 64>>>(in.data(), out.data(), 8); }
    if (which == "reverse") { reverse_block<<<2, 64>>>(in.data(), out.data()); }
    if (which == "reverse_racy") { reverse_block_racy<<<1, 64>>>(in.data(), out.data()); }
    if (which == "last_block") { last_block_wins<<<4, 32>>>(out.data()); }
    if (which == "unwritten") { read_unwritten<<<1, 32, 32 * sizeof(float)>>>(out.data()); }
    if (which == "divergent") { divergent_barrier<<<1, 32>>>(out.data()); }
    if (which == "returned") { shuffle_from_returned<<<1, 32>>>(out.data()); }
    if (which == "half_warps") { half_warp_masks<<<1, 32>>>(out.data()); }
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    return 0;
  }
  for (int i = 0; i < 64; ++i) std::printf("%g ", out[i]);
  std::printf("\n");
  return 0;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("needs a C++ compiler")
    folder = tmp_path_factory.mktemp("emu")
    source = folder / "kernels.cpp"
    source.write_text(rewrite(KERNELS))
    include = Path(torch.__file__).parent / "include"
    binary = folder / "kernels"
    subprocess.run([compiler, "-std=c++20", "-O1", "-w", f"-I{HERE}", f"-I{include}", str(source), "-o", str(binary)],
                   check=True)
    return binary


def run(program, which, order="forward"):
    env = {**os.environ, "SHAMMIE_EMU_THREAD_ORDER": order}
    text = subprocess.run([str(program), which], capture_output=True, text=True, check=True, env=env).stdout.strip()
    return text if text.startswith("error") else [float(v) for v in text.split()]


def test_shuffles_within_groups(program):
    out = run(program, "group_sums")
    assert out == [sum(range(8 * (i // 8), 8 * (i // 8) + 8)) for i in range(64)]


def test_barrier_and_shared_memory_in_every_block(program):
    for order in ("forward", "reverse"):
        assert run(program, "reverse", order) == [63.0 - i for i in range(64)]


def test_a_race_shows_as_an_order_dependence(program):
    assert run(program, "reverse_racy", "forward") != run(program, "reverse_racy", "reverse")


def test_reverse_order_also_reverses_the_blocks(program):
    """So that a sum across blocks whose order is not fixed (float atomics) shows too."""
    assert run(program, "last_block", "forward")[0] == 3.0
    assert run(program, "last_block", "reverse")[0] == 0.0


def test_unwritten_shared_memory_reads_as_nan(program):
    out = run(program, "unwritten")
    assert all(v != v for v in out[:32])


def test_divergent_barrier_is_reported(program):
    assert "deadlock" in run(program, "divergent")


def test_shuffle_from_a_returned_lane_is_reported(program):
    assert "has returned" in run(program, "returned")


def test_disjoint_masks_complete_independently(program):
    out = run(program, "half_warps")
    assert out[:32] == [sum(range(16))] * 16 + [sum(range(16, 32))] * 16
