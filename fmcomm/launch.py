"""Where this process stands in the job: rank, world size, local rank.

Read from the environment the launcher leaves behind. fmcomm never launches a cluster
job of its own; it reads what mpirun/mpiexec (Open MPI, MPICH/Hydra, PMIx), torchrun
and srun set.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from .errors import InitError


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world: int
    local_rank: int
    local_world: int | None
    launcher: str  # "openmpi", "mpich", "pmix", "torchrun", "slurm" or "none"

    @property
    def under_mpi(self) -> bool:
        return self.launcher in ("openmpi", "mpich", "pmix", "slurm")


# (launcher, rank var, world var, local rank var, local world var), first match wins.
# torchrun is checked before the MPI variables: a torchrun job started inside an
# mpiexec allocation is a torchrun job.
_SOURCES = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
     "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("pmix", "PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
)


def _int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise InitError(f"launcher variable {name}={raw!r} is not an integer") from None


def _slurm_tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
    """This node's entry of SLURM_TASKS_PER_NODE-style lists such as ``2(x3),1``.

    The list has one count per node of the allocation, ``N(xM)`` standing for M nodes
    of N tasks; SLURM_NODEID says which node this is.
    """
    raw = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not raw:
        return None
    counts: list[int] = []
    try:
        for part in raw.split(","):
            n, _, rep = part.partition("(x")
            counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    except ValueError:
        raise InitError(f"cannot parse SLURM_NTASKS_PER_NODE={raw!r}") from None
    node = _int(environ, "SLURM_NODEID") or 0
    if len(counts) == 1:
        return counts[0]
    if not 0 <= node < len(counts):
        raise InitError(f"SLURM_NODEID={node} but tasks per node {raw!r} lists {len(counts)} nodes")
    return counts[node]


def detect(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """Rank and world from the launcher's environment; a lone process is rank 0 of 1."""
    environ = os.environ if environ is None else environ
    for launcher, rank_v, world_v, lrank_v, lworld_v in _SOURCES:
        rank, world = _int(environ, rank_v), _int(environ, world_v)
        if rank is None:
            continue
        if world is None and launcher == "pmix":
            world = _int(environ, "OMPI_COMM_WORLD_SIZE")
        if world is None:
            raise InitError(f"{launcher}: {rank_v} is set but {world_v} is not")
        if not 0 <= rank < world:
            raise InitError(f"{launcher}: rank {rank} is outside world size {world}")
        local_rank = _int(environ, lrank_v)
        local_world = _slurm_tasks_on_this_node(environ) if launcher == "slurm" else _int(environ, lworld_v)
        return LaunchInfo(rank, world, rank if local_rank is None else local_rank, local_world, launcher)
    return LaunchInfo(0, 1, 0, 1, "none")
