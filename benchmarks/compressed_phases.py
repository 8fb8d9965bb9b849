"""Where a compressed all-reduce spends its time, phase by phase, on every rank.

    python benchmarks/emulate.py --nodes 2 --per-node 2 --rate 1gbit -- \\
        .venv/bin/python benchmarks/compressed_phases.py --size 64M --compress fp8@inter,onebit@inter

Runs each spec ``--iters`` times on Gaussian data (after one warm-up call) with
``fmcomm.compressed.phase_seconds`` switched on, and prints, per spec, the mean
milliseconds per call of each phase on the slowest rank: agreeing on the bound,
the intra-node reduce-scatter and all-gather (``@inter``), encoding, the exchange
of contributions (all-to-all), the owner's decode-add and re-encode, the all-gather
of sums, and the final decode. Phases nest: the lane's phases happen inside the
two-level call, so "total" is the wall time of the whole call.
"""
import argparse
import time

import torch

import fmcomm
from fmcomm import compressed
from fmcomm.config import parse_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="64M", help="bytes of float32 per rank")
    p.add_argument("--compress", default="fp8@inter,onebit@inter,topk:0.01@inter")
    p.add_argument("--iters", type=int, default=4)
    a = p.parse_args()
    comm = fmcomm.init()
    n = parse_size(a.size) // 4
    x = torch.randn(n, generator=torch.Generator().manual_seed(comm.rank))
    rows = []
    for spec in a.compress.split(","):
        state = fmcomm.compression.ErrorFeedback()
        out = torch.empty_like(x)
        comm.all_reduce(x, compress=spec, state=state, key="x", output=out)  # warm-up: groups, residuals
        compressed.phase_seconds = {}
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            comm.all_reduce(x, compress=spec, state=state, key="x", output=out)
        total = time.perf_counter() - t0
        phases, compressed.phase_seconds = compressed.phase_seconds, None
        phases["total"] = total
        names = sorted(phases)
        mine = torch.tensor([phases[k] / a.iters * 1e3 for k in names], dtype=torch.float64)
        comm.all_reduce(mine, op="max", algo="native")
        rows.append((spec, dict(zip(names, mine.tolist()))))
    if comm.rank == 0:
        print(f"# {comm.world} ranks, {a.size} float32 per rank, mean ms per call, slowest rank per phase")
        for spec, phases in rows:
            print(f"{spec:>18}: " + "  ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    fmcomm.finalize()


if __name__ == "__main__":
    main()
