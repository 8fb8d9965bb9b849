"""How stable fmcomm tune's choices are across runs on one machine.

    python benchmarks/tune_stability.py RUN1.json RUN2.json RUN3.json

For every (collective, size) the tunes measured: the fastest candidate of each run, and
whether the runs agree. Where they differ, the difference counts as noise when some
run measured the other runs' choices within noise of its own (the tables record that
per size); otherwise it is a real disagreement. Also the algorithm each table's rows
give each size (after noise is smoothed over), which is what auto runs.
"""
from __future__ import annotations

import sys
from collections import defaultdict

from fmcomm.tuning import table as tables


def row_choice(table, collective: str, nbytes: int) -> str:
    for row in table.rows:
        if row.collective == collective and row.min_bytes <= nbytes and (row.max_bytes is None or nbytes < row.max_bytes):
            return row.algorithm
    return "-"


def main(paths: list[str]) -> None:
    runs = [tables.load(p) for p in paths]
    measured: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for t in runs:
        for row in t.rows:
            for m in row.measured or []:
                measured[(row.collective, m["bytes"])].append(m)
    same = noise = real = 0
    rows_same = 0
    print(f"{'collective':<15}{'bytes':>10}  {'fastest per run':<48}{'verdict':<12}{'auto per run (rows)'}")
    for (coll, nbytes), ms in sorted(measured.items()):
        choices = [m["choice"] for m in ms]
        if len(set(choices)) == 1:
            verdict = "same"
            same += 1
        elif all(any(c == m["choice"] or c in m.get("within_noise", []) for m in ms) for c in choices):
            verdict = "noise"
            noise += 1
        else:
            verdict = "DIFFERENT"
            real += 1
        autos = [row_choice(t, coll, nbytes) for t in runs]
        rows_same += len(set(autos)) == 1
        print(f"{coll:<15}{nbytes:>10}  {', '.join(choices):<48}{verdict:<12}{', '.join(autos)}")
    total = same + noise + real
    print(f"\n{total} (collective, size) points over {len(runs)} runs: fastest the same in {same}, different but "
          f"within noise in {noise}, different beyond noise in {real}; auto (the rows) the same in {rows_same}")
    for p, t in zip(paths, runs):
        meta = t.meta or {}
        print(f"{p}: {meta.get('seconds')} s, {meta.get('measurements')} timed calls of "
              f"{meta.get('full_sweep_measurements')} for a full sweep, {len(t.rows)} rows")


if __name__ == "__main__":
    main(sys.argv[1:])
