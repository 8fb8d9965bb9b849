"""After fmcomm tune: init() finds the table cached for this machine's topology
fingerprint, and auto runs what the table chose at every measured size (the planner's
choice and the algorithm the call actually ran), with results exact: inputs are small
integers in float32, so every summation order gives the same bytes."""
import json
import traceback

import torch

import fmcomm
from common import parse, report_and_exit
from fmcomm.tuning import table as tables

ARGS = parse({"--table": {"required": True}})


def main():
    comm = fmcomm.init(transport=ARGS.transport)
    rank, world = comm.rank, comm.world
    doc = json.loads(open(ARGS.table).read())
    report = {"fingerprint": {"ok": doc["fingerprint"] == comm.topology.fingerprint(),
                              "error": f"table {doc['fingerprint']}, topology {comm.topology.fingerprint()}"},
              "followed": {"ok": comm.planner.table.source.startswith(f"tuning table {tables.cache_path(doc['fingerprint'])}"),
                           "error": comm.planner.table.source}}
    for row in doc["rows"]:
        for m in row["measured"]:
            key = f"{row['collective']}/{m['bytes']}"
            try:
                if row["collective"] != "all_reduce":
                    continue
                n = m["bytes"] // 4
                request = comm.request("all_reduce", n * 4, fmcomm.dtypes.DTYPES["float32"], "sum", "cpu")
                plan = comm.planner.choose(request)
                t = torch.full((n,), float(rank + 1))
                calls = comm.executor.stats.calls
                fmcomm.all_reduce(t)
                ran_schedule = comm.executor.stats.calls > calls
                ok = (plan.algorithm == row["algorithm"] and plan.reason.startswith("tuning table")
                      and ran_schedule == (row["algorithm"] != "native")
                      and bool((t == world * (world + 1) / 2).all()))
                report[key] = {"ok": ok, "error": f"{plan} ran a schedule: {ran_schedule}"}
            except Exception:  # noqa: BLE001 - reported; the test fails on it
                report[key] = {"ok": False, "error": traceback.format_exc()}
    report_and_exit(ARGS, rank, report)


main()
