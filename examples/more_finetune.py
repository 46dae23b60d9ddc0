"""Fine-tune small Hugging Face models with MoRe adapters and with peft's LoRA, side by side.

Models are built offline from configs (random weights; nothing is downloaded):
- GPT-2 on a synthetic language task: each sequence counts upwards modulo the vocabulary from a
  random start, so the next token is always (token + 1) mod V, a rule the frozen random model does
  not know and the adapters must learn;
- BERT as a sequence classifier: the label is the first token modulo the number of labels (the
  classifier head is trained in full, as `modules_to_save`).
MoRe gets the same or fewer trainable adapter parameters than LoRA. Each method is trained at each
learning rate of a small sweep and reported at its best, so neither is held back by a rate tuned
for the other. Prints parameter counts, the learning rate, the loss at the start and the end,
step time and peak memory.

    python examples/more_finetune.py [--steps 150] [--lrs 2e-3 2e-2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import transformers
from tqdm import tqdm

import shammie.more as more

VOCAB, SEQ = 64, 16


def gpt2():
    config = transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=SEQ, vocab_size=VOCAB)
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=256,
                                     vocab_size=VOCAB, max_position_embeddings=SEQ, num_labels=4)
    return transformers.BertForSequenceClassification(config)


def lm_batch(g, batch=32):
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    ids = (start + torch.arange(SEQ)) % VOCAB
    return {"input_ids": ids, "labels": ids}


def cls_batch(g, batch=32):
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids[:, 0] % 4}


TASKS = {
    "GPT-2 count-up LM": (gpt2, lm_batch, ["c_attn", "c_proj", "c_fc"], []),
    "BERT classifier": (bert, cls_batch, ["query", "value", "dense"], ["classifier"]),
}


def with_more(make, targets, to_save):
    return more.apply(make(), more.MoReConfig(target_modules=targets, modules_to_save=to_save, nblocks=4, blk_r=4))


def with_lora(make, targets, to_save, rank):
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, modules_to_save=to_save or None)
    return peft.get_peft_model(make(), config)


def adapter_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ("lora_" in n or n.endswith((".L", ".R"))))


def train(model, batches, lr, steps, device, label):
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in tqdm(range(steps), desc=label, leave=False):
        batch = {k: v.to(device) for k, v in batches(g).items()}
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return losses, sorted(times)[len(times) // 2], peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 2e-2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    memory = "peak GPU MiB" if device.type == "cuda" else "process peak RSS MiB"
    print(f"{'task':20} {'method':10} {'adapter params':>14} {'trainable':>10} {'lr':>7} {'loss start':>10} "
          f"{'loss end':>9} {'step ms':>8} {memory:>20}")
    for task, (make, batches, targets, to_save) in TASKS.items():
        torch.manual_seed(0)
        probe = with_more(make, targets, to_save)
        # The smallest LoRA rank with at least MoRe's adapter parameters.
        widths = sum(m.in_features + m.out_features for m in probe.modules() if isinstance(m, more.MoReLinear))
        rank = max(1, -(-adapter_params(probe) // widths))
        builders = {"MoRe r=4": lambda: with_more(make, targets, to_save),
                    f"LoRA r={rank}": lambda: with_lora(make, targets, to_save, rank)}
        for method, build in builders.items():
            runs = []
            for lr in args.lrs:
                torch.manual_seed(0)
                model = build()
                losses, step, peak = train(model, batches, lr, args.steps, device, f"{task} {method} lr={lr:g}")
                runs.append((sum(losses[-10:]) / 10, lr, losses, step, peak, model))
            end, lr, losses, step, peak, model = min(runs, key=lambda run: run[0])
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"{task:20} {method:10} {adapter_params(model):>14,} {trainable:>10,} {lr:>7g} "
                  f"{sum(losses[:10]) / 10:>10.3f} {end:>9.3f} {step * 1e3:>8.1f} {peak:>20.0f}")


if __name__ == "__main__":
    main()
