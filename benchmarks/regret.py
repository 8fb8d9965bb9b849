"""auto's regret in an `fmcomm bench --algo auto,<every algorithm> --peer mpi --json F` run.

    python benchmarks/regret.py F.jsonl

Per size and placement: auto's time against the fastest of fmcomm's algorithms measured
in the same run (its regret: auto / best - 1, 0 where auto ran the best), and against
MPI's own collective. Prints the table, then the mean and the largest regret.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by = defaultdict(dict)
    for r in rows:
        name = r["algo"] if r["impl"] == "fmcomm" else r["impl"]
        by[(r["bytes"], r["inplace"])][name] = r["time_us"]
    regrets = []
    print(f"{'bytes':>10} {'place':>6} {'auto us':>10} {'best':>20} {'best us':>10} {'regret':>7} {'mpi us':>10} "
          f"{'auto/mpi':>8}")
    for (nbytes, inplace), times in sorted(by.items()):
        if "auto" not in times:
            continue
        mine = {k: v for k, v in times.items() if k not in ("auto", "mpi", "torch") and v}
        best = min(mine, key=mine.get)
        regret = times["auto"] / mine[best] - 1
        regrets.append(max(regret, 0.0))
        mpi = times.get("mpi")
        print(f"{nbytes:>10} {'in' if inplace else 'out':>6} {times['auto']:>10.1f} {best:>20} {mine[best]:>10.1f} "
              f"{regret:>7.1%} {mpi if mpi else float('nan'):>10.1f} {times['auto'] / mpi if mpi else float('nan'):>8.2f}")
    print(f"\nregret over {len(regrets)} (size, placement) points: mean {sum(regrets) / len(regrets):.1%}, "
          f"largest {max(regrets):.1%} (a negative regret, auto beating every algorithm run apart, counts as 0)")


if __name__ == "__main__":
    main(sys.argv[1])
