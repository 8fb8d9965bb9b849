"""Train a small MoE transformer with expert parallelism on fmcomm.moe; report its loss curve
and the share of the step its token exchange takes.

    mpiexec -n 4 .venv/bin/python benchmarks/train_moe.py [--steps 200] [--algo direct] [--compress fp8]
        [--json FILE]
    python benchmarks/emulate.py --nodes 2 --per-node 2 --rate 1gbit -- \\
        .venv/bin/python benchmarks/train_moe.py --algo hierarchical ...

Data: the corpus of ``benchmarks/train.py`` (the Python standard library's ``.py``
files, bytes as tokens; ``train_model.load_corpus`` and ``Batches``: every rank reads
its own windows, the last 5% held out).

Model: byte embedding + position, ``--layers`` pre-LayerNorm blocks of causal
self-attention and an MoE feed-forward layer: a router (linear, softmax), top-2 experts
per token with their two probabilities renormalized as weights, ``--experts-per-rank``
experts (d → 4d → d, GELU) on every rank. The dense parts are replicated and their
gradients averaged over ranks each step (``fmcomm.all_reduce``, one flat buffer); each
expert lives on one rank and receives its gradient through ``combine``'s backward, from
every rank's tokens (divided by the world size, as the loss is the mean over ranks).
A load-balancing loss (Switch Transformer's: E · Σ_e fraction_e · mean probability_e,
weight 0.01) keeps tokens spread over the experts.

Timing: every rank times each step; ``exchange`` is the time spent in dispatch's
agreement and in the routes' exchanges (forward and backward, with their
permutations), measured by wrapping ``fmcomm.moe.agree`` and ``fmcomm.moe.route.run``
here. Reported: medians over steps after the first 5 of the slowest rank's step time
and of the exchange's share of it.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmcomm  # noqa: E402
import fmcomm.moe as moe  # noqa: E402
from train_model import Batches, load_corpus  # noqa: E402

VOCAB = 256


class ExchangeClock:
    """Seconds spent in fmcomm.moe's agreement and route runs (wraps them for this benchmark only)."""

    def __init__(self):
        self.seconds = 0.0
        self._agree, self._run = moe.agree, moe.route.run
        moe.agree = self._timed(self._agree)
        moe.route.run = self._timed(self._run)

    def _timed(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


class MoEFeedForward(nn.Module):
    def __init__(self, d: int, experts_per_rank: int, comm, algo: str, compress):
        super().__init__()
        self.comm, self.algo, self.compress = comm, algo, compress
        self.num_experts = experts_per_rank * comm.world
        self.router = nn.Linear(d, self.num_experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                     for _ in range(experts_per_rank))
        self.balance_loss = torch.zeros(())

    def forward(self, x):
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(tokens), dim=-1)
        top, chosen = probs.topk(2, dim=-1)
        weights = top / top.sum(-1, keepdim=True)
        # Switch Transformer's balancing term over this rank's tokens.
        fraction = torch.bincount(chosen.reshape(-1), minlength=self.num_experts).float() / chosen.numel()
        self.balance_loss = self.num_experts * (fraction * probs.mean(0)).sum()
        expert_in, handle = moe.dispatch(tokens, chosen, self.num_experts, weights=weights, group=self.comm,
                                         algo=self.algo, compress=self.compress)
        parts = expert_in.split(handle.tokens_per_expert)
        expert_out = torch.cat([f(p) for f, p in zip(self.experts, parts)])
        return moe.combine(expert_out, handle).view(shape)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = ff

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.ff(self.ln2(x))


class MoEGPT(nn.Module):
    def __init__(self, args, comm):
        super().__init__()
        d = args.d_model
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(args.ctx, d)
        self.blocks = nn.ModuleList(Block(d, args.heads, MoEFeedForward(d, args.experts_per_rank, comm, args.algo,
                                                                        args.compress))
                                    for _ in range(args.layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, idx):
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        x = self.tok(idx) + self.pos(torch.arange(t))
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))

    def balance_loss(self):
        return sum(b.ff.balance_loss for b in self.blocks)

    def expert_parameters(self):
        return [p for b in self.blocks for p in b.ff.experts.parameters()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--algo", default="auto", choices=["auto", "direct", "hierarchical"])
    ap.add_argument("--compress", default=None, choices=[None, "fp8"])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--experts-per-rank", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def evaluate(model, batches) -> float:
    with torch.no_grad():
        losses = [F.cross_entropy(model(x[:, 2:]).reshape(-1, VOCAB), y.reshape(-1)).item()
                  for x, y in batches.val_batches()]
    return sum(losses) / len(losses)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    comm = fmcomm.init()
    rank, world = comm.rank, comm.world
    train, val, info = load_corpus()
    batches = Batches(train, val, args.ctx, args.batch, args.seed, rank, world)
    # Dense weights equal on every rank (one seed), experts different per rank.
    torch.manual_seed(args.seed)
    model = MoEGPT(args, comm)
    with torch.no_grad():
        for i, p in enumerate(model.expert_parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(args.seed * 7919 + rank * 101 + i))
                    * (p.std() if p.numel() > 1 else 0.02))
    experts = set(map(id, model.expert_parameters()))
    dense = [p for p in model.parameters() if id(p) not in experts]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    clock = ExchangeClock()
    rows, step_times, shares = [], [], []
    for step in range(args.steps):
        x, y = batches.train_batch(step)
        t0 = time.perf_counter()
        clock.seconds = 0.0
        logits = model(x[:, 2:])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        (loss + 0.01 * model.balance_loss()).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in dense])
        fmcomm.all_reduce(flat, op="avg", group=comm)
        at = 0
        for p in dense:
            p.grad.copy_(flat[at:at + p.numel()].view_as(p))
            at += p.numel()
        for p in model.expert_parameters():
            p.grad.div_(world)  # the exchange summed every rank's contribution; the loss is their mean
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        times = torch.tensor([dt, clock.seconds, loss.item()], dtype=torch.float64)
        gathered = torch.zeros(world * 3, dtype=torch.float64)
        gathered[rank * 3:rank * 3 + 3] = times
        fmcomm.all_reduce(gathered, group=comm)
        per_rank = gathered.view(world, 3)
        slowest = int(per_rank[:, 0].argmax())
        row = {"step": step, "loss": float(per_rank[:, 2].mean()), "step_s": float(per_rank[slowest, 0]),
               "exchange_s": float(per_rank[slowest, 1])}
        if step % args.eval_every == 0 or step == args.steps - 1:
            row["val_loss"] = evaluate(model, batches)
        rows.append(row)
        if step >= 5:
            step_times.append(row["step_s"])
            shares.append(row["exchange_s"] / row["step_s"])
        if rank == 0 and ("val_loss" in row):
            print(f"step {step:4d}  train loss {row['loss']:.3f}  val loss {row['val_loss']:.3f}  "
                  f"step {1e3 * row['step_s']:.0f} ms  exchange {1e3 * row['exchange_s']:.0f} ms", flush=True)
    summary = {"world": world, "nodes": len(set(comm.topology.node_of)), "algo": args.algo,
               "compress": args.compress, "steps": args.steps, "median_step_s": statistics.median(step_times),
               "median_exchange_share": statistics.median(shares), "final_val_loss": rows[-1]["val_loss"],
               "first_val_loss": rows[0]["val_loss"], "transport": comm.transport.name,
               "parameters": sum(p.numel() for p in model.parameters()), "data": info,
               "args": vars(args)}
    if rank == 0:
        print(f"# {world} ranks on {summary['nodes']} node(s), route {args.algo}, compress {args.compress}: "
              f"median step {1e3 * summary['median_step_s']:.0f} ms (slowest rank), exchange "
              f"{100 * summary['median_exchange_share']:.0f}% of it; val loss "
              f"{summary['first_val_loss']:.3f} -> {summary['final_val_loss']:.3f} after {args.steps} steps "
              f"(ln 256 = {math.log(256):.3f})")
        if args.json:
            Path(args.json).write_text(json.dumps({"summary": summary, "steps": rows}, indent=1))
    fmcomm.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
