"""Manticore on a MAD-style synthetic task (in-context associative recall), on CPU in a few minutes.

Each sequence lists key/value pairs, then repeats one key; the model must answer with that key's value:
    k1 v1 k2 v2 ... kn vn  q  v(q)
Only the answer is scored. A tiny GPT-2 and a tiny Mamba (or Mamba2 with `--ssm mamba2`; built offline from
configs, random weights) are each trained briefly on the task; the hybrid is built from them and goes through the three Manticore phases:
projector pretraining, α search (α on validation batches, projectors on training batches) and fine-tuning with
α fixed. Prints the α trajectory and the final accuracy against each component alone, both as it was handed
to the hybrid and after the same number of extra fine-tuning steps as the hybrid got (a fair budget).

    python examples/manticore_mad.py [--ssm mamba|mamba2] [--component-steps 1200] [--search-steps 120] [--finetune-steps 400]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import transformers
from tqdm import tqdm

from shammie.integrations.transformers import use_shammie_kernels
from shammie.manticore import Manticore, finetune, pretrain_projectors, search

KEYS, VALUES, PAIRS = 16, 16, 6
VOCAB = KEYS + VALUES
LENGTH = 2 * PAIRS + 2


def recall_batch(g: torch.Generator, batch: int) -> dict:
    keys = torch.argsort(torch.rand(batch, KEYS, generator=g), dim=-1)[:, :PAIRS]
    values = KEYS + torch.randint(0, VALUES, (batch, PAIRS), generator=g)
    which = torch.randint(0, PAIRS, (batch, 1), generator=g)
    query, answer = keys.gather(1, which), values.gather(1, which)
    ids = torch.cat([torch.stack([keys, values], -1).flatten(1), query, answer], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = answer[:, 0]
    return {"input_ids": ids, "labels": labels}


def batches(seed: int, n: int, batch: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [recall_batch(g, batch) for _ in range(n)]


def gpt2(width):
    config = transformers.GPT2Config(n_layer=2, n_embd=width, n_head=4, n_positions=LENGTH, vocab_size=VOCAB,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def mamba(width):
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=width, state_size=16, num_hidden_layers=2,
                                      expand=2, conv_kernel=4)
    return transformers.MambaForCausalLM(config)


def mamba2(width):
    config = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=width, state_size=16, num_hidden_layers=2,
                                       expand=2, head_dim=16, num_heads=2 * width // 16, n_groups=1, conv_kernel=4,
                                       chunk_size=16)
    return transformers.Mamba2ForCausalLM(config)


SSMS = {"mamba": ("Mamba", mamba), "mamba2": ("Mamba2", mamba2)}


def lm_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)


def train_component(model, data, steps, lr, label):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    with use_shammie_kernels():
        for i, batch in enumerate(tqdm(data[:steps], desc=label)):
            optimizer.zero_grad()
            lm_loss(model(batch["input_ids"]).logits, batch["labels"]).backward()
            optimizer.step()
    return model


@torch.no_grad()
def accuracy(forward, data) -> str:
    """Accuracy and mean loss on the answers."""
    hits = total = loss = 0.0
    with use_shammie_kernels():
        for batch in data:
            logits = forward(batch["input_ids"])
            hits += (logits[:, -2].argmax(-1) == batch["input_ids"][:, -1]).sum().item()
            loss += lm_loss(logits, batch["labels"]).item() * batch["input_ids"].shape[0]
            total += batch["input_ids"].shape[0]
    return f"{hits / total:.3f} (loss {loss / total:.3f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ssm", choices=sorted(SSMS), default="mamba", help="the state-space component")
    parser.add_argument("--component-steps", type=int, default=1200)
    parser.add_argument("--projector-steps", type=int, default=200)
    parser.add_argument("--search-steps", type=int, default=120)
    parser.add_argument("--finetune-steps", type=int, default=400)
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="for the hybrid and for each component alone")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of the components' pretraining")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--mixtures", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (these models are tiny: more threads mostly add contention)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    n_train = max(args.component_steps, args.projector_steps, args.search_steps, args.finetune_steps)
    train, val, test = batches(1, n_train, args.batch), batches(2, 16, args.batch), batches(3, 16, 64)

    ssm_name, build_ssm = SSMS[args.ssm]
    components = {"gpt2": train_component(gpt2(args.width), train, args.component_steps, args.lr, "pretrain GPT-2"),
                  args.ssm: train_component(build_ssm(args.width), train, args.component_steps, args.lr,
                                            f"pretrain {ssm_name}")}
    alone = {name: accuracy(lambda ids, m=m.eval(): m(ids).logits, test) for name, m in components.items()}

    hybrid = Manticore.from_models([copy.deepcopy(m) for m in components.values()], n_mixtures=args.mixtures,
                                   projector="linear_skip", alpha_mode="softmax")
    print("\ninitial α\n" + hybrid.alphas())
    pretrain_projectors(hybrid, train, steps=args.projector_steps, lr=3e-3)
    history = search(hybrid, train, val, steps=args.search_steps, alpha_lr=0.05, projector_lr=3e-3)
    print("\nα trajectory during search (α of each model, per mixture position):")
    names = list(components)
    for step in sorted({0, *range(9, args.search_steps, max(1, args.search_steps // 8)), args.search_steps - 1}):
        row = "  ".join("[" + ", ".join(f"{n}={a:.3f}" for n, a in zip(names, mix)) + "]"
                        for mix in history["alpha"][step])
        print(f"  step {step + 1:4d}  val loss {history['val_loss'][step]:.3f}  {row}")
    searched = accuracy(lambda ids: hybrid.eval()(ids)[0], test)
    finetune(hybrid, train, steps=args.finetune_steps, lr=args.finetune_lr)
    print("\nα after search (fixed for fine-tuning)\n" + hybrid.alphas())
    final = accuracy(lambda ids: hybrid.eval()(ids)[0], test)

    # the same extra budget for each component alone
    longer = {name: accuracy(lambda ids, m=train_component(m.train(), train, args.finetune_steps, args.finetune_lr,
                                                           f"fine-tune {name} alone").eval(): m(ids).logits, test)
              for name, m in components.items()}

    print(f"\nassociative recall ({PAIRS} pairs, {KEYS} keys, {VALUES} values), accuracy on {16 * 64} test sequences:")
    for name in names:
        print(f"  {name:<6} alone: {alone[name]} after {args.component_steps} steps; {longer[name]} after "
              f"{args.finetune_steps} more")
    print(f"  hybrid: {searched} after projector pretraining + search; {final} after {args.finetune_steps} "
          "fine-tuning steps")
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
