"""MoRe adapter cases: the adapter's cost on Llama-7B-shaped projections (q/k/v: 4096→4096,
up: 4096→11008) with 2048 tokens, against peft's LoRA with the same parameter count (rank 4).

Two views per shape:
- "adapter": the adapter's own work, x -> ΔW·x added into an existing output (peft adds LoRA's
  output in a separate pass; MoReLinear folds it into the base GEMM, so its path is M(x) alone);
- "layer": the whole adapted layer, with the frozen base nn.Linear timed too, for the overhead.
"""

from __future__ import annotations

import sys

import torch

try:
    import peft   # the LoRA peer; the MoRe cases are skipped without it
except ImportError:
    peft = None

from shammie.benchmarks.harness import Case
from shammie.more import MoReLinear

SHAPES = [("Llama-7B q/k/v 4096→4096", 4096, 4096), ("Llama-7B up 4096→11008", 4096, 11008)]
TOKENS = 2048


def lora_layer(base: torch.nn.Linear, rank: int) -> torch.nn.Module:
    """peft's LoRA layer of the given rank around `base` (peft must be installed)."""
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

    model = peft.get_peft_model(Holder(), peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():   # LoRA's B starts at zero; any values time the same, non-zero ones check nothing is skipped
        layer.lora_B["default"].weight.normal_(0, 0.01)
    return layer


def _cases_for(name, n_in, n_out, dtype, device, with_layer: bool) -> list[Case]:
    base = torch.nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    ours = MoReLinear(base, nblocks=4, blk_r=4).to(device=device, dtype=dtype)
    with torch.no_grad():
        ours.R.normal_(0, 0.01)
    rank = round(ours.adapter_parameters / (n_in + n_out))
    lora = lora_layer(base, rank).to(device=device, dtype=dtype)
    lora_a, lora_b, scale = lora.lora_A["default"], lora.lora_B["default"], lora.scaling["default"]
    size = torch.empty((), dtype=dtype).element_size()

    def make_x(device_):
        return [torch.randn(TOKENS, n_in, generator=torch.Generator().manual_seed(0)).to(device=device_, dtype=dtype)]

    out = torch.zeros(TOKENS, n_out, device=device, dtype=dtype)   # the base output the adapter adds into
    params = ours.adapter_parameters
    peer_name = f"peft {peft.__version__} LoRA, rank {rank} ({rank * (n_in + n_out):,} params; MoRe {params:,})"
    adapter_case = Case(
        op="MoRe adapter", shape=f"{name} M={TOKENS}", dtype=dtype, make_inputs=make_x,
        ours=ours.adapter, peer=lambda x: out + lora_b(lora_a(x)) * scale, peer_name=peer_name,
        bytes_forward=size * TOKENS * (n_in + n_out), bytes_backward=size * TOKENS * (2 * n_in + n_out),
        flops_forward=2.0 * TOKENS * params, flops_backward=4.0 * TOKENS * params)
    gemm = 2.0 * TOKENS * n_in * n_out
    layer_case = Case(
        op="MoRe layer", shape=f"{name} M={TOKENS}", dtype=dtype, make_inputs=make_x,
        ours=ours, peer=lora, peer_name=peer_name, baseline=base, baseline_name="frozen nn.Linear",
        bytes_forward=size * (TOKENS * (n_in + n_out) + n_in * n_out),
        bytes_backward=size * (TOKENS * (2 * n_in + n_out) + n_in * n_out),
        flops_forward=gemm + 2.0 * TOKENS * params, flops_backward=gemm + 4.0 * TOKENS * params)
    return [adapter_case, layer_case] if with_layer else [adapter_case]


def cases(device: torch.device, dtypes=None) -> list[Case]:
    if peft is None:
        print("shammie bench: skipping the MoRe cases: peft (the LoRA peer) is not installed", file=sys.stderr)
        return []
    dtypes = dtypes or ([torch.bfloat16] if device.type == "cuda" else [torch.float32])
    # On CPU a 4096→11008 base GEMM fwd+bwd takes seconds: the whole-layer view there only for q/k/v.
    return [c for dtype in dtypes for i, (name, n_in, n_out) in enumerate(SHAPES)
            for c in _cases_for(name, n_in, n_out, dtype, device, with_layer=device.type == "cuda" or i == 0)]
