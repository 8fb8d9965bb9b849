"""One rank of an emulated-cluster test job (started by benchmarks/emulate.py).

All-reduces with torch.distributed (gloo) and with fmcomm, optionally times one large
all-reduce (gloo, and MPI_Allreduce when launched by mpiexec) while reading the node's
eth0 byte counters, and writes what it saw to OUT/rank<RANK>.json.

    python rank_program.py --out DIR [--big-bytes N] [--mpi]
"""
import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

import fmcomm

TX_BYTES = Path("/sys/class/net/eth0/statistics/tx_bytes")


def tx_bytes() -> int:
    # ip netns exec remounted /sys, so this is the emulated node's eth0.
    return int(TX_BYTES.read_text())


def timed_on_link(barrier, run) -> dict:
    """Run ``run`` between barriers; the node's eth0 bytes sent and the seconds it took."""
    barrier()
    tx0, t0 = tx_bytes(), time.perf_counter()
    run()
    barrier()
    return {"seconds": time.perf_counter() - t0, "tx_bytes": tx_bytes() - tx0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--big-bytes", type=int, default=0, help="also time a float32 all-reduce of this many bytes")
    p.add_argument("--mpi", action="store_true", help="also all-reduce through mpi4py (needs mpiexec)")
    a = p.parse_args()

    comm = fmcomm.init()  # from the environment emulate.py gave: torchrun's, or mpiexec's
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    expected = world * (world + 1) / 2

    t = torch.full((1000,), float(rank + 1))
    dist.all_reduce(t)
    f = torch.full((1 << 16,), float(rank + 1))
    fmcomm.all_reduce(f)

    report = {
        "hostname": socket.gethostname(),
        "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                               "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME",
                                               "FMCOMM_NODE_ID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")},
        "rank": rank, "world": world, "fmcomm_rank": comm.rank, "fmcomm_world": comm.world,
        "fmcomm_transport": comm.transport.name,
        "gloo_ok": bool((t == expected).all()), "fmcomm_ok": bool((f == expected).all()),
    }
    if a.big_bytes:
        big = torch.ones(a.big_bytes // 4)
        report["gloo_big"] = timed_on_link(dist.barrier, lambda: dist.all_reduce(big))
        report["gloo_big"]["ok"] = bool((big == world).all())
    if a.mpi:
        from mpi4py import MPI
        mpi = MPI.COMM_WORLD
        report["mpi_rank"], report["mpi_world"] = mpi.Get_rank(), mpi.Get_size()
        if a.big_bytes:
            buf = torch.ones(a.big_bytes // 4).numpy()
            report["mpi_big"] = timed_on_link(mpi.Barrier, lambda: mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
            report["mpi_big"]["ok"] = bool((buf == world).all())

    out = Path(a.out)
    tmp = out / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(report))
    tmp.rename(out / f"rank{rank}.json")
    dist.barrier()
    fmcomm.finalize()
    dist.destroy_process_group()  # gloo aborts at exit if its group is still up


if __name__ == "__main__":
    main()
