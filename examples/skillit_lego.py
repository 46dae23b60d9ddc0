"""Skill-It against uniform skill sampling on LEGO chains, training a tiny GPT-2 (built from a config, random
weights, nothing downloaded) on the CPU at equal steps.

LEGO (Zhang et al. 2022), generated here: a chain of variable assignments and negations
"a = +1 ; d = -a ; k = +d ; ..." (random letters; clauses in chain order by default, shuffled with
--shuffle). Skill i (i = 1..depth) asks for the value of the i-th variable of the chain, which is the
parity of the first i signs: each depth builds on the one before, the prerequisite structure that
Skill-It's skills graph encodes. The query names the depth (a depth token; with --shuffle, the variable's
letter, the original, much harder task). The model answers "+" or "-" after the query.

Skills graph: "chain" (default): A[i, i] = A[i, i+1] = 1 (training on depth i helps depths i and i+1,
the structure the Skill-It paper reports for LEGO); "estimate": shammie.skillit.estimate_skills_graph,
brute force from a checkpoint trained uniformly for --graph-warmup steps (that training is extra
compute Skill-It gets; it is reported). Skill-It updates the mixture every --eval-every steps from
the per-skill validation losses (η = 0.5, window 3, the research code's LEGO settings).

Prints per-skill accuracy for both methods at each evaluation, the final and the area-under-curve mean
accuracy per seed; saves a plot (--plot, needs matplotlib; skipped with a note when not installed).

    python examples/skillit_lego.py [--steps 1500] [--seeds 1] [--graph chain|estimate] [--plot lego.png]
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import transformers
from tqdm import tqdm

from shammie.skillit import SkillItSampler, estimate_skills_graph

LETTERS = 12
PLUS = LETTERS + 1  # token ids of the answers '+' and '-' (PLUS + 1)


class Lego:
    """Token ids: letters 0..11, '=', '+', '-', ONE, QUERY, then one depth token per skill."""

    def __init__(self, depth: int, shuffle: bool):
        self.depth, self.shuffle = depth, shuffle
        self.EQ, self.PLUS, self.MINUS, self.ONE, self.QUERY = range(LETTERS, LETTERS + 5)
        self.vocab = LETTERS + 5 + depth

    def batch(self, skills: torch.Tensor, generator: torch.Generator | None = None):
        """Examples for skill ids (B,) (0-based depth): input ids (B, 4·depth + 2), answer token (B,)."""
        B, n = skills.numel(), self.depth
        rows = torch.arange(B)
        letters = torch.argsort(torch.rand(B, LETTERS, generator=generator), 1)[:, :n]
        signs = torch.randint(0, 2, (B, n), generator=generator)  # 0: '+', 1: '-'
        rhs = torch.cat([torch.full((B, 1), self.ONE), letters[:, :-1]], 1)
        clauses = torch.stack([letters, torch.full((B, n), self.EQ), self.PLUS + signs, rhs], 2)
        if self.shuffle:
            clauses = clauses[rows[:, None], torch.argsort(torch.rand(B, n, generator=generator), 1)]
            query = letters[rows, skills]
        else:
            query = LETTERS + 5 + skills
        x = torch.cat([clauses.reshape(B, -1), torch.full((B, 1), self.QUERY), query[:, None]], 1)
        value = signs.cumsum(1).remainder(2)[rows, skills]
        return x, self.PLUS + value


def make_model(task: Lego, args, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=task.vocab, n_positions=4 * task.depth + 2, n_embd=args.width,
                                  n_layer=args.layers, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def step_loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).logits[:, -1], y)


def optimize(model, opt, loss):
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def schedule(opt, steps, warmup=100):
    """Linear warm-up, then cosine decay to 10% of the rate (the same for both methods)."""
    def f(t):
        if t < warmup:
            return (t + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / max(1, steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


@torch.no_grad()
def evaluate(model, val):
    """Per-skill validation loss and accuracy (the answer is whichever of '+', '-' scores higher)."""
    x, y, skill = val
    logits = model(x).logits[:, -1]
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    plus, minus = logits[:, PLUS], logits[:, PLUS + 1]
    correct = torch.where(plus >= minus, PLUS, PLUS + 1) == y
    k = int(skill.max()) + 1
    per = lambda v: torch.zeros(k).index_add_(0, skill, v.float()) / torch.bincount(skill, minlength=k)  # noqa: E731
    return per(loss), per(correct)


def train(task, model, args, sampler, val, seed, desc):
    """Train for args.steps; sampler None = uniform. Returns [(step, per-skill acc)], the mixtures used."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = schedule(opt, args.steps)
    g = torch.Generator().manual_seed(1000 + seed)
    k = task.depth
    curve, mixtures = [], []
    for step in tqdm(range(args.steps + 1), desc=desc, leave=False):
        if step % args.eval_every == 0:
            losses, acc = evaluate(model, val)
            curve.append((step, acc))
            if sampler is not None:
                mixtures.append(sampler.update(losses).clone())
        if step == args.steps:
            break
        skills = sampler.sample(args.batch, g) if sampler is not None else torch.randint(0, k, (args.batch,), generator=g)
        x, y = task.batch(skills, g)
        optimize(model, opt, step_loss(model, x, y))
        sched.step()
    return curve, mixtures


def solved_at(curve, threshold):
    """The first evaluated step at which every skill's accuracy reaches threshold (None: never)."""
    return next((step for step, acc in curve if bool((acc >= threshold).all())), None)


def skills_graph(task, args, val, seed):
    k = task.depth
    if args.graph == "chain":
        return torch.eye(k) + torch.diag(torch.ones(k - 1), 1), 0
    start = make_model(task, args, seed)
    if args.graph_warmup:
        train(task, start, argparse.Namespace(**{**vars(args), "steps": args.graph_warmup}), None, val, seed,
              "graph warm-up")

    def train_on(i, steps):
        model = copy.deepcopy(start)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        g = torch.Generator().manual_seed(7 + i)
        for _ in range(steps):
            x, y = task.batch(torch.full((args.batch,), i), g)
            optimize(model, opt, step_loss(model, x, y))
        return model

    A = estimate_skills_graph(train_on, lambda m: evaluate(start if m is None else m, val)[0], k=k,
                              steps=args.graph_steps, nonnegative=True)
    return A, args.graph_warmup + k * args.graph_steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eta", type=float, default=0.5)
    ap.add_argument("--window", type=int, default=3)
    ap.add_argument("--graph", choices=["chain", "estimate"], default="chain")
    ap.add_argument("--graph-warmup", type=int, default=300)
    ap.add_argument("--graph-steps", type=int, default=100)
    ap.add_argument("--shuffle", action="store_true")
    ap.add_argument("--solved", type=float, default=0.95, help="accuracy at which a skill counts as learned")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", default="skillit_lego.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = Lego(args.depth, args.shuffle)
    k = args.depth
    g = torch.Generator().manual_seed(12345)
    vskill = torch.arange(k).repeat_interleave(200)
    val = (*task.batch(vskill, g), vskill)
    results = []
    t0 = time.time()
    for seed in range(args.seeds):
        A, graph_steps = skills_graph(task, args, val, seed)
        if seed == 0:
            print(f"skills graph ({args.graph}, {graph_steps} extra training steps):\n{A.numpy().round(2)}")
        uni, _ = train(task, make_model(task, args, seed), args, None, val, seed, f"seed {seed} uniform")
        sampler = SkillItSampler(A, eta=args.eta, window=args.window)
        ski, mix = train(task, make_model(task, args, seed), args, sampler, val, seed, f"seed {seed} skill-it")
        results.append((uni, ski, mix))
        fin_u, fin_s = uni[-1][1].mean().item(), ski[-1][1].mean().item()
        auc_u = torch.stack([a for _, a in uni]).mean().item()
        auc_s = torch.stack([a for _, a in ski]).mean().item()
        print(f"seed {seed}: final mean accuracy uniform {fin_u:.3f} skill-it {fin_s:.3f}; "
              f"mean over evaluations uniform {auc_u:.3f} skill-it {auc_s:.3f}; first step with every skill "
              f">= {args.solved:.2f}: uniform {solved_at(uni, args.solved)} skill-it {solved_at(ski, args.solved)}")
        print("  per-skill final accuracy  uniform", uni[-1][1].numpy().round(2), " skill-it", ski[-1][1].numpy().round(2))
        print("  skill-it mixture at 1/4, 1/2, end:", *(mix[i].numpy().round(2) for i in
                                                       (len(mix) // 4, len(mix) // 2, -1)))
    print("\nper-skill accuracy over steps (seed 0):\n| step | " + " | ".join(
        f"uniform d{i + 1}" for i in range(k)) + " | " + " | ".join(f"skill-it d{i + 1}" for i in range(k)) + " |")
    uni, ski, _ = results[0]
    stride = max(1, len(uni) // 10)
    rows = list(zip(uni, ski))[::stride]
    if rows[-1][0][0] != uni[-1][0]:
        rows.append((uni[-1], ski[-1]))
    for (step, au), (_, as_) in rows:
        print(f"| {step} | " + " | ".join(f"{v:.2f}" for v in au.tolist()) + " | "
              + " | ".join(f"{v:.2f}" for v in as_.tolist()) + " |")
    if args.seeds > 1:
        fu = torch.tensor([r[0][-1][1].mean().item() for r in results])
        fs = torch.tensor([r[1][-1][1].mean().item() for r in results])
        au = torch.tensor([torch.stack([a for _, a in r[0]]).mean().item() for r in results])
        as_ = torch.tensor([torch.stack([a for _, a in r[1]]).mean().item() for r in results])
        print(f"\nover {args.seeds} seeds: final mean accuracy uniform {fu.mean():.3f} ± {fu.std():.3f}, "
              f"skill-it {fs.mean():.3f} ± {fs.std():.3f}; mean over evaluations uniform {au.mean():.3f} ± "
              f"{au.std():.3f}, skill-it {as_.mean():.3f} ± {as_.std():.3f} (skill-it ahead on "
              f"{int((as_ > au).sum())} of {args.seeds}); steps until every skill >= {args.solved:.2f}: uniform "
              f"{[solved_at(r[0], args.solved) for r in results]}, skill-it {[solved_at(r[1], args.solved) for r in results]}")
    print(f"wall time {time.time() - t0:.0f} s")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, axes = plt.subplots(1, k, figsize=(3 * k, 3), sharey=True)
    for i, ax in enumerate(axes):
        for name, idx, style in (("uniform", 0, "--"), ("skill-it", 1, "-")):
            steps = [s for s, _ in results[0][idx]]
            acc = torch.stack([torch.stack([a[i] for _, a in r[idx]]) for r in results]).mean(0)
            ax.plot(steps, acc.numpy(), style, label=name)
        ax.set_title(f"depth {i + 1}")
        ax.set_xlabel("step")
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    main()
