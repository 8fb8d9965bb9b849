"""Resident memory over many compressed all-reduces of random sizes (1 KiB - 1 MiB).

Error-feedback residuals used to be keyed by element count when a call gave no
``key=``: every new size kept two more residual buffers for good, and two tensors of
one size shared (and corrupted) one. Now a call without a key keeps nothing between
calls. This program makes ``--calls`` calls of each configuration in turn and prints
the resident set size before and after, per rank.

    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/residual_memory.py --calls 2000
"""
import argparse
import json
import sys

import torch

import fmcomm


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--configs", default="none,onebit,topk:0.01")
    args = ap.parse_args()
    comm = fmcomm.init()
    rows = []
    for config in args.configs.split(","):
        gen = torch.Generator().manual_seed(11)  # the same sizes on every rank and for every config
        before = rss_mb()
        for _ in range(args.calls):
            n = int(torch.randint(256, 262145, (1,), generator=gen))  # 1 KiB .. 1 MiB of float32
            t = torch.randn(n, generator=gen)
            comm.all_reduce(t, compress=None if config == "none" else config)
        after = rss_mb()
        rows.append({"config": config, "rank": comm.rank, "calls": args.calls, "rss_before_mb": round(before, 1),
                     "rss_after_mb": round(after, 1), "residual_keys": len(comm.error_feedback)})
        comm.error_feedback.reset()
    for row in rows:
        print(json.dumps(row))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
