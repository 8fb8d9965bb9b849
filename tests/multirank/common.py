"""Shared by the programs that tests run on several ranks."""
import argparse
import json
import os
import sys
from pathlib import Path


def launcher_rank_world() -> tuple[int, int]:
    """This process's rank and world size from the launcher's variables (read before fmcomm starts)."""
    env = os.environ
    rank = env.get("PMI_RANK", env.get("OMPI_COMM_WORLD_RANK", env.get("RANK", "0")))
    world = env.get("PMI_SIZE", env.get("OMPI_COMM_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    return int(rank), int(world)


def split_into_nodes(nodes: int) -> None:
    """Emulate ``nodes`` nodes on this machine: FMCOMM_NODE_ID from the launcher's rank, ranks in order."""
    rank, world = launcher_rank_world()
    os.environ["FMCOMM_NODE_ID"] = f"node{rank * nodes // world}"


def parse(extra=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--transport", default="mpi")
    for name, kw in (extra or {}).items():
        p.add_argument(name, **kw)
    return p.parse_args()


def write_report(args, rank: int, report: dict) -> None:
    """This rank's report, written whole or not at all."""
    out = Path(args.out)
    tmp = out / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(report))
    tmp.rename(out / f"rank{rank}.json")


def report_and_exit(args, rank: int, report: dict) -> None:
    """Write this rank's report, wait for every rank, mark it finished, and leave without MPI_Finalize.

    A failed collective may leave requests posted; finalizing MPI (or gloo) with them
    pending can block, so after the barrier on COMM_WORLD (which fmcomm does not use)
    every rank exits at once.
    """
    write_report(args, rank, report)
    from mpi4py import MPI
    MPI.COMM_WORLD.Barrier()
    # Past the barrier every rank has written its report and nothing of the test runs
    # any more: the harness reads this mark as "this rank finished" (see run_ranks).
    (Path(args.out) / f"rank{rank}.finished").touch()
    sys.stdout.flush()
    sys.stderr.flush()
    # Hydra SIGKILLs the other ranks as soon as one exits without MPI_Finalize, so the
    # first rank out could kill another before it made its mark (CI: ranks 1 and 3 of 4,
    # exit 9). After this second barrier every mark exists.
    MPI.COMM_WORLD.Barrier()
    os._exit(0)
