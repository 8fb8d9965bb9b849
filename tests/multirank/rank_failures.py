"""Ranks that misbehave: the others must get a typed error within the timeout.

Scenarios (rank 1 is the odd one out):
- size:   rank 1 passes one element more than the others
- dtype:  rank 1 passes float64 where the others pass float32
- silent: rank 1 never makes the call
- root:   rank 1 broadcasts from root 1, the others from root 0
- splits: rank 1's all_to_all_single output splits do not match what the others send
- compress: rank 1 asks for an fp8 compressed all-reduce where the others ask for onebit
- algo:   rank 1 runs ``--algo``, the others the engine's native all-reduce
- uncompressed: rank 1 asks for an uncompressed all-reduce, the others for fp8
- new_group: rank ``--victim`` leaves (exit 0) as the others make a group; they must get
  a typed error within the timeout, also where the victim hosted the store (rank 0)
Each rank reports the exception type it got and its message. Then every rank makes
one more call, which must be refused (the communicator is unusable after a failure).
"""
import os
import time

import torch

import fmcomm
from common import parse, report_and_exit, write_report


def main():
    args = parse({"--scenario": {"required": True}, "--algo": {"default": "ring"}, "--victim": {"type": int,
                                                                                            "default": 1}})
    comm = fmcomm.init(transport=args.transport)
    rank = comm.rank
    timeout = comm.config.timeout
    n = 1000
    t = torch.ones(n + 1 if (args.scenario == "size" and rank == 1) else n,
                   dtype=torch.float64 if (args.scenario == "dtype" and rank == 1) else torch.float32)
    report = {"rank": rank}
    start = time.monotonic()
    try:
        if args.scenario == "new_group":
            if rank == args.victim:
                write_report(args, rank, {"rank": rank, "error": None, "victim": True})
                os._exit(0)
            comm.new_group(range(comm.world))
        elif args.scenario == "silent" and rank == 1:
            time.sleep(timeout + 2)  # every peer gives up first: they left fmcomm.init with this rank
        elif args.scenario == "root":
            fmcomm.broadcast(t, src=1 if rank == 1 else 0, algo=args.algo)
        elif args.scenario == "splits":
            world = comm.world
            send = [2] * world
            recv = [2] * world
            if rank == 1:
                recv = [3] + [2] * (world - 2) + [1]  # same total, wrong pairing
            fmcomm.all_to_all_single(torch.zeros(sum(recv)), torch.ones(sum(send)), recv, send)
        elif args.scenario == "compress":
            fmcomm.all_reduce(t, compress="fp8" if rank == 1 else "onebit")
        elif args.scenario == "algo":
            fmcomm.all_reduce(t, algo=args.algo if rank == 1 else "native")
        elif args.scenario == "uncompressed":
            fmcomm.all_reduce(t, compress=None if rank == 1 else "fp8")
        else:
            fmcomm.all_reduce(t, algo=args.algo)
        report["error"] = None
    except fmcomm.FmcommError as e:
        report.update(error=type(e).__name__, message=str(e), peer=getattr(e, "peer", None),
                      seq=getattr(e, "seq", None))
    report["elapsed"] = time.monotonic() - start
    if args.scenario == "new_group":
        write_report(args, rank, report)  # no closing barrier: a rank is gone
        os._exit(0)
    if report["error"]:
        try:
            fmcomm.all_reduce(torch.ones(4))
            report["after"] = "accepted"
        except fmcomm.FmcommError as e:
            report["after"] = type(e).__name__
    report_and_exit(args, rank, report)


if __name__ == "__main__":
    main()
