"""Manticore hybrid step: forward and forward+backward of a GPT-2 + Mamba (or Mamba2) hybrid (2 mixture positions,
softmax α, linear_skip projectors, every parameter trainable) with its Mamba blocks on shammie's ops, against the
same hybrid on transformers' torch fallback path (Mamba: its Python loop over the sequence; Mamba2: its chunked
SSD in einsums), on the same weights and tokens.
Rates count tokens: GFLOP/s from 2·params·tokens forward and 4·params·tokens backward (embeddings included)."""

from __future__ import annotations

import importlib.util
import sys

import torch

from shammie.benchmarks.harness import Case
from shammie.benchmarks.selective_scan import mamba_ssm_ops

# (name, second model, width, layers per model, batch, length): small models, so the CPU cases stay within seconds
SHAPES = [("GPT-2 2×128 + Mamba 2×128, vocab 2048, 2×64 tokens", "mamba", 128, 2, 2, 64),
          ("GPT-2 2×128 + Mamba2 2×128, vocab 2048, 2×64 tokens", "mamba2", 128, 2, 2, 64)]
VOCAB = 2048    # a small shared vocabulary: the LM heads would otherwise dominate both paths alike


def _hybrid(second, width, layers, device, dtype):
    import transformers

    from shammie.manticore import Manticore

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=layers, n_embd=width, n_head=width // 64, n_positions=1024, vocab_size=VOCAB,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if second == "mamba":
        ssm = transformers.MambaForCausalLM(transformers.MambaConfig(
            vocab_size=VOCAB, hidden_size=width, state_size=16, num_hidden_layers=layers, expand=2, conv_kernel=4))
    else:   # Mamba2's usual head width 64 and N 128
        ssm = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            vocab_size=VOCAB, hidden_size=width, state_size=128, num_hidden_layers=layers, expand=2, head_dim=64,
            num_heads=2 * width // 64, n_groups=1, conv_kernel=4, chunk_size=64))
    models = [m.to(device=device, dtype=dtype) for m in (gpt2, ssm)]
    return Manticore.from_models(models, n_mixtures=2, projector="linear_skip").train()


def _peer_name(device) -> str:
    # transformers' Mamba / Mamba2 call mamba_ssm's and causal-conv1d's kernels on CUDA where they import.
    if torch.device(device).type == "cuda" and mamba_ssm_ops():
        return "the same hybrid on transformers' Mamba / Mamba2 path, here with mamba_ssm's and causal-conv1d's kernels"
    return "the same hybrid on transformers' torch fallback for Mamba / Mamba2 (no mamba_ssm)"


def _case(name, second, width, layers, batch, length, dtype, device) -> Case:
    hybrid = _hybrid(second, width, layers, device, dtype)

    def run(kernels):
        def forward(ids):
            hybrid.config.shammie_kernels = kernels
            return hybrid(ids)[0]
        return forward

    def make_inputs(device_):
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, VOCAB, (batch, length), generator=g).to(device_)]

    params = sum(p.numel() for p in hybrid.parameters())
    tokens = batch * length
    size = torch.empty((), dtype=dtype).element_size()
    return Case(op="manticore step", shape=name, dtype=dtype, make_inputs=make_inputs, ours=run(True), peer=run(False),
                peer_name=_peer_name(device),
                bytes_forward=size * (params + tokens * VOCAB), bytes_backward=size * (2 * params + tokens * VOCAB),
                flops_forward=2.0 * params * tokens, flops_backward=4.0 * params * tokens)


def cases(device: torch.device, dtypes=None) -> list[Case]:
    if any(importlib.util.find_spec(name) is None for name in ("transformers", "safetensors", "tqdm")):
        print("shammie bench: skipping the manticore cases: transformers/safetensors/tqdm not installed",
              file=sys.stderr)
        return []
    dtypes = dtypes or ([torch.bfloat16] if device.type == "cuda" else [torch.float32])
    return [_case(*shape, dtype, device) for dtype in dtypes for shape in SHAPES]
