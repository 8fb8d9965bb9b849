"""The module-level API: ``fmcomm.init()``, ``fmcomm.all_reduce()``, ``fmcomm.info()``.

Mirrors torch.distributed: one default communicator, made by :func:`init`, serves
calls that pass no ``group``.
"""
from __future__ import annotations

import logging
import platform
import socket
from typing import Any

from . import launch
from .communicator import Communicator
from .config import Config
from .errors import InitError
from .kernels import NATIVE_IMPORT_ERROR, native_available

_default: Communicator | None = None


def _mpi_importable() -> bool:
    from .transport import mpi
    return mpi.MPI is not None


def init(transport: str | None = None, *, comm: Any = None, group: Any = None, rank: int | None = None,
         world_size: int | None = None, **options: Any) -> Communicator:
    """Start fmcomm in this process and return the default communicator.

    Where the job stands is found, in order, from: an mpi4py communicator passed as
    ``comm``; a torch.distributed group passed as ``group`` (or an already initialized
    default group); explicit ``rank``/``world_size`` (rendezvous through MASTER_ADDR
    and MASTER_PORT); the launcher's environment (mpirun/mpiexec of Open MPI or MPICH,
    PMIx, srun, torchrun). ``transport`` ("mpi" or "torch") and any other configuration
    option may be given here; they override ``FMCOMM_*`` variables.
    """
    global _default
    import torch.distributed as dist

    config = Config.from_env(transport=transport, **options)
    logging.getLogger("fmcomm").setLevel(config.log_level.upper())
    info = launch.detect()
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise InitError("pass both rank and world_size, or neither")
        info = launch.LaunchInfo(rank, world_size, rank, None, "explicit")
    kind = config.transport
    if comm is not None:
        kind = "mpi"
    elif group is not None:
        kind = "torch"
    elif kind == "auto":
        if dist.is_available() and dist.is_initialized():
            kind = "torch"
        elif info.under_mpi and _mpi_importable():
            kind = "mpi"
        elif info.launcher in ("torchrun", "explicit"):
            kind = "torch"
        else:
            kind = "mpi" if _mpi_importable() else "torch"

    if kind == "mpi":
        from .transport.mpi import MPITransport
        t = MPITransport(comm)
    else:
        from .transport.torch_dist import TorchTransport, init_default_group
        if group is None and not dist.is_initialized():
            mpi_comm = None
            if info.under_mpi and _mpi_importable():
                from mpi4py import MPI
                mpi_comm = MPI.COMM_WORLD
            init_default_group(info.rank, info.world, timeout_s=config.timeout, mpi_comm=mpi_comm)
        t = TorchTransport(group)
    if _default is not None:
        _default.close()
    _default = Communicator(t, config)
    return _default


def default_communicator() -> Communicator:
    if _default is None:
        raise InitError("fmcomm.init() has not been called in this process")
    return _default


def finalize() -> None:
    """Finish outstanding work and release the default communicator."""
    global _default
    if _default is not None:
        _default.close()
        _default = None


def all_reduce(tensor, op: str = "sum", algo: str | None = None, group: Communicator | None = None,
               async_op: bool = False, output=None, compress=None, state=None, key=None,
               max_error: float | None = None):
    """All-reduce ``tensor`` in place over ``group`` (default: the communicator from init).

    ``op``: sum, avg, min, max or prod. ``algo``: auto, native or a schedule's name
    (default from FMCOMM_ALGO). Torch tensors (CPU; CUDA over NCCL or CUDA-aware MPI)
    and NumPy arrays of float32, float64, float16, bfloat16, int32 and int64, any size.
    Returns a work handle with ``wait()`` if ``async_op``.

    ``compress``: ``fp16``, ``bf16``, ``fp8``, ``onebit`` or ``topk:RATIO``, each
    optionally ``@inter`` (compress between nodes only), for float sum/avg;
    ``state``/``key``: where error feedback keeps its residuals (see
    :meth:`Communicator.all_reduce`). ``compress="auto"`` with ``max_error``: the
    fastest compressor here (or none) whose relative error is at most ``max_error``.
    """
    comm = group if group is not None else default_communicator()
    return comm.all_reduce(tensor, op=op, algo=algo, async_op=async_op, output=output, compress=compress,
                           state=state, key=key, max_error=max_error)


def reduce_scatter(output, input, op: str = "sum", algo: str | None = None, group: Communicator | None = None,
                   async_op: bool = False):
    """Reduce ``input`` (world blocks the size of ``output``) over ranks; rank r gets block r in ``output``."""
    return (group or default_communicator()).reduce_scatter(output, input, op=op, algo=algo, async_op=async_op)


def all_gather(output, input, algo: str | None = None, group: Communicator | None = None, async_op: bool = False):
    """Concatenate every rank's ``input``, in rank order, into every rank's ``output``."""
    return (group or default_communicator()).all_gather(output, input, algo=algo, async_op=async_op)


def broadcast(tensor, src: int, algo: str | None = None, group: Communicator | None = None, async_op: bool = False):
    """Rank ``src``'s ``tensor`` into every rank's ``tensor``."""
    return (group or default_communicator()).broadcast(tensor, src, algo=algo, async_op=async_op)


def reduce(tensor, dst: int, op: str = "sum", algo: str | None = None, group: Communicator | None = None,
           async_op: bool = False):
    """Reduce ``tensor`` over ranks into rank ``dst``'s ``tensor``; other ranks' tensors are left as they were."""
    return (group or default_communicator()).reduce(tensor, dst, op=op, algo=algo, async_op=async_op)


def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, algo: str | None = None,
                      group: Communicator | None = None, async_op: bool = False):
    """torch.distributed.all_to_all_single's contract: uneven splits along dim 0, zeros allowed."""
    return (group or default_communicator()).all_to_all_single(
        output, input, output_split_sizes, input_split_sizes, algo=algo, async_op=async_op)


def barrier(group: Communicator | None = None, async_op: bool = False):
    """Return once every rank of the group has entered the barrier."""
    return (group or default_communicator()).barrier(async_op=async_op)


def new_group(ranks, group: Communicator | None = None) -> Communicator | None:
    """A communicator over ``ranks`` of ``group`` (default: init's); every rank of ``group`` calls it."""
    return (group or default_communicator()).new_group(ranks)


def get_rank(group: Communicator | None = None) -> int:
    return (group or default_communicator()).rank


def get_world_size(group: Communicator | None = None) -> int:
    return (group or default_communicator()).world


def info() -> dict[str, Any]:
    """What this installation and process have: native kernels, engines, job placement."""
    import torch

    from .transport import mpi as mpi_mod
    d: dict[str, Any] = {
        "version": __import__("fmcomm").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "native_kernels": native_available(),
        "native_error": NATIVE_IMPORT_ERROR,
        "reduce_path": "native (fmcomm._C)" if native_available() else "torch fallback",
        "mpi4py": mpi_mod.MPI is not None,
        "gloo": torch.distributed.is_available() and torch.distributed.is_gloo_available(),
        "nccl": torch.distributed.is_available() and torch.distributed.is_nccl_available(),
        "cuda": torch.cuda.is_available(),
        "hostname": socket.gethostname(),
        "launch": launch.detect().__dict__,
    }
    if mpi_mod.MPI is not None:
        d["mpi_library"] = mpi_mod.MPI.Get_library_version().splitlines()[0].strip()
    if _default is not None:
        d["communicator"] = {"rank": _default.rank, "world": _default.world,
                             "transport": _default.transport.name, "reducer": "native" if _default.use_native else "torch"}
    return d
