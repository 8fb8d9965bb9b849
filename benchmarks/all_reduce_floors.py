"""Run the all-reduce benchmark and judge it against the foundation floors.

    python benchmarks/all_reduce_floors.py [-n 2] [--iters 20] [--out benchmarks/results]

Runs ``fmcomm bench all_reduce`` once (fmcomm auto, ring and native beside
MPI_Allreduce and torch's gloo all_reduce, all in the same invocation, results
checked), keeps the table and the JSON rows under ``--out``, and prints per size:
ring's bus bandwidth as a ratio of MPI_Allreduce's, and auto's time as a ratio of
the faster of ring and native. The floors it reports against: ring >= 0.7x
MPI_Allreduce from 1 MiB up; auto <= 1.1x min(ring, native) everywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2)
    p.add_argument("-b", default="4K")
    p.add_argument("-e", default="64M")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--transport", default="mpi")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"all_reduce_np{a.n}_{a.transport}"
    rows_file = out / f"{stem}.jsonl"
    rows_file.unlink(missing_ok=True)
    fmcomm = Path(sys.executable).parent / "fmcomm"
    cmd = [str(fmcomm), "bench", "all_reduce", "-n", str(a.n), "-b", a.b, "-e", a.e, "-f", "4",
           "--algo", "auto,ring,native", "--peer", "mpi,torch", "--check", "--iters", str(a.iters),
           "--transport", a.transport, "--json", str(rows_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        if not r["inplace"]:
            best[(r["impl"] if r["impl"] != "fmcomm" else r["algo"], r["bytes"])] = r
    lines = [f"# floors, {a.n} ranks, fmcomm over {a.transport} (out-of-place rows)",
             f"{'bytes':>10} {'ring/MPI busbw':>15} {'auto/min(ring,native) time':>27}"]
    ok = True
    for nbytes in sorted({b for _, b in best}):
        ring, native, auto, mpi = (best.get((k, nbytes)) for k in ("ring", "native", "auto", "mpi"))
        r1 = ring["busbw_GBps"] / mpi["busbw_GBps"] if ring and mpi else float("nan")
        fastest = min(x["time_us"] for x in (ring, native) if x)
        r2 = auto["time_us"] / fastest if auto else float("nan")
        flag = ""
        if nbytes >= 1 << 20 and r1 < 0.7:
            flag += " ring<0.7x"
        if r2 > 1.1:
            flag += " auto>1.1x"
        ok &= not flag
        lines.append(f"{nbytes:>10} {r1:>15.2f} {r2:>27.2f}{flag}")
    lines.append("# all floors met" if ok else "# some floors missed (marked)")
    summary = "\n".join(lines)
    print(summary)
    (out / f"{stem}.txt").write_text(proc.stdout + summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
