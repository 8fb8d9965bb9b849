"""Started by torchrun (not mpiexec): fmcomm.init() must find rank and world from its
environment and run an all-reduce over torch.distributed."""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import fmcomm


def main():
    out = Path(sys.argv[1])
    comm = fmcomm.init()
    t = torch.full((10,), float(comm.rank + 1))
    fmcomm.all_reduce(t)
    report = {"rank": comm.rank, "world": comm.world, "transport": comm.transport.name,
              "env_rank": int(os.environ["RANK"]), "sum": t.tolist()}
    (out / f"rank{comm.rank}.json").write_text(json.dumps(report))
    fmcomm.finalize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
