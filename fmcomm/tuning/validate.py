"""Predicted against measured: the cost model's time for each row ``fmcomm bench --json``
wrote, on a topology (a machine file the probes measured, or a preset).

    python -m fmcomm.tuning.validate BENCH.jsonl [...] --topology FILE_OR_PRESET [--placement out|in|both]

prints one line per (collective, algorithm, size, placement): measured, predicted, and
the error (predicted - measured) / measured; then the median of the absolute errors and
the largest. Compressed all-reduce rows (named by their spec) are priced from their
plan of phases (``fmcomm.tuning.plans``). Rows of the engines (``mpi``, ``torch``) and fmcomm's ``native``/``auto``
rows are skipped: the cost model prices fmcomm's own schedules only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Iterable

from ..dtypes import DTYPES
from ..topology import presets
from ..topology.model import Topology
from ..compression import parse
from ..errors import InvalidArgument
from .cost import price
from .plans import price_compressed_all_reduce


def _is_compression(algo: str) -> bool:
    """A compressed all-reduce's row: fmcomm bench names it by its spec (e.g. ``fp8:e4m3@inter``)."""
    from ..algorithms import REGISTRY
    if ("all_reduce", algo) in REGISTRY:
        return False
    try:
        return parse(algo).enabled
    except InvalidArgument:
        return False


def compare(rows: Iterable[dict], topo: Topology, placements=(False, True)) -> list[dict]:
    out = []
    for r in rows:
        if r.get("impl") != "fmcomm" or r.get("algo") in ("native", "auto") or r.get("inplace") not in placements:
            continue
        if r.get("world") != topo.world:
            raise ValueError(f"a row of {r.get('world')} ranks against a topology of {topo.world}")
        if r.get("time_us") is None:
            continue
        if r["collective"] == "all_reduce" and _is_compression(r["algo"]):
            predicted = price_compressed_all_reduce(topo, r["bytes"], r["algo"]).seconds
        else:
            predicted = price(r["collective"], r["algo"], topo, r["bytes"], DTYPES[r["dtype"]].itemsize).seconds
        measured = r["time_us"] * 1e-6
        out.append({**{k: r[k] for k in ("collective", "algo", "bytes", "inplace")}, "measured_s": measured,
                    "predicted_s": predicted, "error": (predicted - measured) / measured})
    return out


def report(cases: list[dict]) -> str:
    lines = [f"{'collective':>15} {'algo':>20} {'bytes':>10} {'place':>5} {'measured':>12} {'predicted':>12} {'error':>8}"]
    for c in cases:
        lines.append(f"{c['collective']:>15} {c['algo']:>20} {c['bytes']:>10} {'in' if c['inplace'] else 'out':>5} "
                     f"{c['measured_s'] * 1e3:>10.2f}ms {c['predicted_s'] * 1e3:>10.2f}ms {c['error']:>+8.1%}")
    if cases:
        errs = [abs(c["error"]) for c in cases]
        worst = max(cases, key=lambda c: abs(c["error"]))
        lines.append(f"median |error| {statistics.median(errs):.1%} over {len(cases)} cases; largest "
                     f"{worst['error']:+.1%} ({worst['collective']} {worst['algo']} {worst['bytes']} B)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fmcomm.tuning.validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", nargs="+", help="JSON lines from fmcomm bench --json")
    ap.add_argument("--topology", required=True, help="a machine file or preset with measured figures")
    ap.add_argument("--placement", choices=["out", "in", "both"], default="both")
    a = ap.parse_args(argv)
    topo = presets.load(a.topology)
    rows = [json.loads(line) for path in a.bench for line in open(path) if line.strip()]
    placements = {"out": (False,), "in": (True,), "both": (False, True)}[a.placement]
    print(report(compare(rows, topo, placements)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
