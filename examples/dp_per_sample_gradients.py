"""Differentially private fine-tuning of a Mamba model with MoRe adapters: per-sample gradients with
torch.func through shammie's kernels (DP-SGD, as Opacus' functorch mode computes it).

DP-SGD needs each example's gradient, to clip it before the batch is summed and noised. torch.func
gets them in one call, `vmap(grad(loss))` over the examples, where a loop would run one backward per
example. shammie's ops run under those transforms (shammie/_functorch.py); mamba_ssm's and
causal-conv1d's autograd Functions raise there.

A small HF Mamba model is built offline from a config (random weights; nothing is downloaded), runs
through shammie's kernels (`use_shammie_kernels`), and gets MoRe adapters on its in- and
out-projections. The task: each sequence counts upwards modulo the vocabulary from a random start.
Prints the adapter's size, the time of one batch of per-sample gradients by vmap and by a loop of
backward passes (and how far apart they are), and the loss over the DP-SGD steps.

    python examples/dp_per_sample_gradients.py [--steps 60] [--batch 16] [--clip 1.0] [--noise 0.5]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from tqdm import tqdm

import shammie.more as more
from shammie.integrations.transformers import use_shammie_kernels

VOCAB, SEQ = 64, 24


def mamba(device):
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=64, state_size=16, num_hidden_layers=2, expand=2,
                                      conv_kernel=4)
    model = transformers.MambaForCausalLM(config)
    more.apply(model, more.MoReConfig(target_modules=["in_proj", "out_proj"], nblocks=4, blk_r=4))
    return model.to(device)


def count_up_batch(g, batch, device):
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    return ((start + torch.arange(SEQ)) % VOCAB).to(device)


def per_sample_gradients_vmap(model, params, ids):
    """{name: (batch, *shape)}: one vmapped call of grad over the examples."""
    def loss(params, example):
        return torch.func.functional_call(model, params, (example[None],), {"labels": example[None]}).loss

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, ids)


def per_sample_gradients_loop(model, params, ids):
    """The same by one backward per example."""
    grads = []
    for example in ids:
        loss = model(example[None], labels=example[None]).loss
        grads.append(torch.autograd.grad(loss, list(params.values())))
    return {name: torch.stack(g) for name, g in zip(params, zip(*grads))}


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def dp_sgd_step(model, params, optimizer, ids, clip, noise, g):
    """Clip each example's gradient to norm `clip`, sum, add N(0, (noise·clip)²) and average."""
    per_sample = per_sample_gradients_vmap(model, {n: p.detach() for n, p in params.items()}, ids)
    norms = torch.sqrt(sum(grad.flatten(1).square().sum(1) for grad in per_sample.values()))
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    for name, p in params.items():
        summed = torch.einsum("b,b...->...", scale, per_sample[name])
        noised = summed + noise * clip * torch.randn(summed.shape, generator=g).to(summed.device)
        p.grad = noised / ids.shape[0]
    optimizer.step()
    return norms


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--noise", type=float, default=0.5, help="noise multiplier σ")
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = mamba(args.device).train()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    print(f"Mamba with MoRe adapters on in_proj and out_proj: {more.trainable_parameters(model)}")

    with use_shammie_kernels():
        ids = count_up_batch(g, args.batch, args.device)
        detached = {n: p.detach() for n, p in params.items()}
        per_sample_gradients_vmap(model, detached, ids)   # warm-up
        by_vmap, vmap_s = timed(lambda: per_sample_gradients_vmap(model, detached, ids), args.device)
        by_loop, loop_s = timed(lambda: per_sample_gradients_loop(model, params, ids), args.device)
        gap = max((by_vmap[n] - by_loop[n]).abs().max().item() for n in params)
        scale = max(by_loop[n].abs().max().item() for n in params)
        print(f"per-sample gradients of {args.batch} examples: vmap(grad) {vmap_s * 1e3:.1f} ms, loop of backward "
              f"passes {loop_s * 1e3:.1f} ms ({loop_s / vmap_s:.2f}x); max |vmap - loop| = {gap:.2e} "
              f"(largest gradient {scale:.2e})")

        optimizer = torch.optim.Adam(params.values(), lr=args.lr)
        eval_ids = count_up_batch(torch.Generator().manual_seed(99), 64, args.device)
        evaluate = lambda: model(eval_ids, labels=eval_ids).loss.item()
        with torch.no_grad():
            start_loss = evaluate()
        for _ in tqdm(range(args.steps), desc="DP-SGD", leave=False):
            norms = dp_sgd_step(model, params, optimizer, count_up_batch(g, args.batch, args.device), args.clip,
                                args.noise, g)
        with torch.no_grad():
            end_loss = evaluate()
    print(f"DP-SGD, clip {args.clip}, noise multiplier {args.noise}, {args.steps} steps of {args.batch}: held-out "
          f"loss {start_loss:.3f} -> {end_loss:.3f} (median per-example gradient norm at the end "
          f"{norms.median().item():.2f})")


if __name__ == "__main__":
    main()
