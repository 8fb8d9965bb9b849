"""Bytes that cross nodes: hierarchical vs ring all-reduce on 2 nodes x 2 ranks.

Node membership comes from FMCOMM_NODE_ID (set per rank by the test), so this runs
without root; tests/emulated runs the same on real network namespaces.
"""
import torch

import fmcomm
from common import parse, report_and_exit


def main():
    args = parse({"--count": {"type": int, "default": 1 << 18}})
    comm = fmcomm.init(transport=args.transport)
    report = {"node_of": list(comm.topology.node_of)}
    for algo in ("hierarchical", "ring"):
        t = torch.full((args.count,), float(comm.rank + 1))
        before = comm.executor.stats.inter_node_bytes, comm.executor.stats.wire_bytes
        fmcomm.all_reduce(t, algo=algo)
        report[algo] = {
            "inter_node_bytes": comm.executor.stats.inter_node_bytes - before[0],
            "wire_bytes": comm.executor.stats.wire_bytes - before[1],
            "ok": bool((t == sum(range(1, comm.world + 1))).all()),
        }
    report_and_exit(args, comm.rank, report)


if __name__ == "__main__":
    main()
