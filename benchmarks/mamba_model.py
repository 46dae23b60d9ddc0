"""Whole-model benchmark: a MambaForCausalLM with the Mamba-130M configuration, a Mamba2ForCausalLM
with Mamba2-130M's (`--model mamba2`), or a Bamba / Jamba hybrid of that width (`--model bamba|jamba`),
random weights, built offline; prefill and greedy generation in tokens/s, on transformers' own torch
path and inside `use_shammie_kernels()`, side by side in one process.

    python -m shammie.benchmarks.mamba_model [--model mamba|mamba2|bamba|jamba] [--device cpu] [--prompt 512] [--new-tokens 32] [--batch 1] [--threads N]

On a shared, loaded CPU pass --threads 1: with more threads than free cores every small parallel op waits
for a descheduled worker (milliseconds per op), which swamps a decode step on both paths.
"""

from __future__ import annotations

import argparse
import time

import torch


def mamba_130m(device, dtype):
    import transformers

    config = transformers.MambaConfig(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24,
                                      expand=2, conv_kernel=4, time_step_rank=48)
    torch.manual_seed(0)
    return transformers.MambaForCausalLM(config).to(device=device, dtype=dtype).eval()


def mamba2_130m(device, dtype):
    import transformers

    config = transformers.Mamba2Config(vocab_size=50280, hidden_size=768, state_size=128, num_hidden_layers=24,
                                       expand=2, head_dim=64, num_heads=24, n_groups=1, conv_kernel=4, chunk_size=256)
    torch.manual_seed(0)
    return transformers.Mamba2ForCausalLM(config).to(device=device, dtype=dtype).eval()


def bamba_small(device, dtype):
    """A Bamba (Mamba-2 + attention) hybrid at the 130M models' width: 24 layers, 3 of them attention."""
    import transformers

    config = transformers.BambaConfig(vocab_size=50280, hidden_size=768, intermediate_size=2048, num_hidden_layers=24,
                                      attn_layer_indices=[6, 12, 18], num_attention_heads=12, num_key_value_heads=4,
                                      mamba_n_heads=24, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128,
                                      mamba_expand=2, mamba_chunk_size=256)
    torch.manual_seed(0)
    return transformers.BambaForCausalLM(config).to(device=device, dtype=dtype).eval()


def jamba_small(device, dtype):
    """A Jamba (Mamba-1 + attention + MoE) hybrid at the 130M models' width: 24 layers, attention every
    8th, 4 experts (top 2) every other layer."""
    import transformers

    config = transformers.JambaConfig(vocab_size=50280, hidden_size=768, intermediate_size=1536, num_hidden_layers=24,
                                      attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
                                      expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                                      num_attention_heads=12, num_key_value_heads=4, mamba_d_state=16,
                                      mamba_d_conv=4, mamba_expand=2)
    torch.manual_seed(0)
    return transformers.JambaForCausalLM(config).to(device=device, dtype=dtype).eval()


MODELS = {"mamba": ("MambaForCausalLM, Mamba-130M config", mamba_130m),
          "mamba2": ("Mamba2ForCausalLM, Mamba2-130M config", mamba2_130m),
          "bamba": ("BambaForCausalLM, 24 layers (3 attention) at width 768", bamba_small),
          "jamba": ("JambaForCausalLM, 24 layers (3 attention, MoE every other) at width 768", jamba_small)}


def _timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run(device: torch.device, dtype: torch.dtype, batch: int, prompt: int, new_tokens: int, repeats: int,
        model_name: str = "mamba") -> list[dict]:
    from shammie.benchmarks.selective_scan import mamba_ssm_ops
    from shammie.integrations.transformers import use_shammie_kernels

    model = MODELS[model_name][1](device, dtype)
    ids = torch.randint(0, 50280, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    short = ids[:, :16]
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    rows = []
    with torch.no_grad():
        # transformers calls mamba_ssm's and causal-conv1d's kernels on CUDA where they import.
        hf_label = "hf+mamba_ssm" if device.type == "cuda" and mamba_ssm_ops() else "transformers"
        for label, patch in ((hf_label, None), ("shammie", use_shammie_kernels)):
            ctx = patch() if patch else None
            try:
                model(ids[:, :8])   # warm-up
                prefill = _timed(lambda: model(ids, use_cache=True), device, repeats)
                generate = _timed(lambda: model.generate(short, **gen), device, repeats)
            finally:
                if ctx:
                    ctx.restore()
            rows.append({"path": label, "prefill_tok_s": batch * prompt / prefill,
                         "generate_tok_s": batch * new_tokens / generate})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mamba", choices=sorted(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = run(device, dtype, args.batch, args.prompt, args.new_tokens, args.repeats, args.model)
    print(f"{MODELS[args.model][0]}, random weights, {args.dtype} on {device}, batch {args.batch}, "
          f"{torch.get_num_threads()} CPU threads: "
          f"prefill {args.prompt} tokens, generate {args.new_tokens} tokens after a 16-token prompt")
    for r in rows:
        print(f"  {r['path']:<13} prefill {r['prefill_tok_s']:10.1f} tok/s   generate {r['generate_tok_s']:8.1f} tok/s")
    base, ours = rows
    print(f"  speedup       prefill {ours['prefill_tok_s'] / base['prefill_tok_s']:10.2f} x       "
          f"generate {ours['generate_tok_s'] / base['generate_tok_s']:8.2f} x")


if __name__ == "__main__":
    main()
