"""torch.distributed point-to-point: gloo on CPU, NCCL on GPU.

Runs over a process group the caller made (or the default group). Waits use
``Work.wait(timeout)``, which blocks in C++ with the GIL released.
"""
from __future__ import annotations

import collections
import datetime
import time
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..dtypes import DType
from ..errors import CommTimeoutError, InitError, TransportError, UnsupportedError
from .base import Transport

_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT,
        "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


# Groups made so far from each group (by its store prefix) in this process. Every rank
# of a group makes its groups in the same order, so the counts agree across ranks.
_MADE: "collections.Counter[str]" = collections.Counter()


class TorchTransport(Transport):
    """Point to point and the engine's collectives over one torch.distributed group.

    ``group`` is a process group the caller made (None: the default group); the
    transport only borrows it. :meth:`private` and :meth:`subgroup` make groups of
    fmcomm's own instead, which only fmcomm sends on (see :func:`private_backend`).
    Ranks are always the group's own (0 .. world-1).
    """
    name = "torch"

    def __init__(self, group=None, *, _backend=None, _prefix: str = ""):
        if not dist.is_available() or not dist.is_initialized():
            raise InitError("transport 'torch' needs an initialized torch.distributed process group")
        self.group = group
        # fmcomm's own backend where it made one. A borrowed default group is looked up
        # at each use (``_pg``), never held: held past the caller's
        # destroy_process_group(), it was torn down at interpreter exit, where gloo's
        # threads sometimes aborted the process ("terminate called without an active
        # exception", 5 runs in 10 of a torchrun test).
        self._own = _backend
        self._closed = False
        if _backend is None:
            self.backend = str(dist.get_backend(group)).lower()
            self._prefix = f"fmcomm/{_group_name(self._pg)}"
        else:
            self.backend, self._prefix = str(_backend.name()).lower(), _prefix
        self.rank, self.world = self._pg.rank(), self._pg.size()

    @property
    def _pg(self):
        if self._own is not None:
            return self._own
        if self._closed:
            raise InitError(f"rank {self.rank}: this fmcomm group was closed")
        return self._borrowed()

    def _borrowed(self):
        """The caller's group (its default group where none was given)."""
        return self.group if self.group is not None else dist.distributed_c10d._get_default_group()

    @classmethod
    def private(cls, group=None, timeout: float = 300.0, purpose: str = "private") -> "TorchTransport":
        """A transport over a new group of the same ranks as ``group``, for fmcomm's traffic alone.

        Every rank of ``group`` calls it, in the same order; the ranks meet through the
        group's own store within ``timeout`` seconds (ranks outside ``group`` take no part).
        """
        parent = cls(group)
        return parent._derived(list(range(parent.world)), timeout, purpose)

    def _derived(self, ranks, timeout: float, purpose: str) -> "TorchTransport | None":
        # Numbered per parent group and process, not per transport object: two hooks'
        # private groups over one process group must meet under different names.
        _MADE[self._prefix] += 1
        serial = _MADE[self._prefix]
        if self.rank not in ranks:
            return None
        prefix = f"{self._prefix}/{purpose}{serial}-{'.'.join(map(str, ranks))}"
        # The caller's store, looked up where it is needed and not kept, as its group.
        store = dist.PrefixStore(prefix + "/", _group_store(self._borrowed()))
        backend = private_backend(self.backend, store, ranks.index(self.rank), len(ranks), timeout,
                                  f"rank {self.rank}: {purpose} group of ranks {ranks}")
        return TorchTransport(self.group, _backend=backend, _prefix=prefix)

    def byte_view(self, t: torch.Tensor) -> Any:
        on_gpu = t.device.type == "cuda"
        if on_gpu and "nccl" not in self.backend:
            raise UnsupportedError(f"backend {self.backend} cannot move {t.device} tensors point to point")
        if not on_gpu and self.backend == "nccl":
            raise UnsupportedError("backend nccl cannot move CPU tensors; use a gloo group")
        return t.view(torch.uint8)

    def isend(self, peer: int, buf: Any, tag: int) -> Any:
        return self._pg.send([buf], peer, tag)

    def irecv(self, peer: int, buf: Any, tag: int) -> Any:
        return self._pg.recv([buf], peer, tag)

    def wait(self, requests: Sequence[Any], deadline: float) -> bool:
        for work in requests:
            left = deadline - time.monotonic()
            if left <= 0 and not work.is_completed():
                return False
            try:
                work.wait(datetime.timedelta(seconds=max(left, 0.001)))
            except RuntimeError as e:
                if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                    return False
                raise
        return True

    def supports_native(self, collective: str, dtype: DType, op: str, device: str) -> bool:
        return collective == "all_to_all" or (collective == "all_reduce" and op in _OPS)

    def native_all_to_all(self, inp, out, send_counts, recv_counts) -> Any:
        if hasattr(self._pg, "alltoall_base"):
            return self._pg.alltoall_base(out, inp, list(recv_counts), list(send_counts))
        return dist.all_to_all_single(out, inp, output_split_sizes=list(recv_counts),
                                      input_split_sizes=list(send_counts), group=self.group, async_op=True)

    def native_all_reduce(self, inp: torch.Tensor, out: torch.Tensor, dtype: DType, op: str) -> Any:
        if inp.data_ptr() != out.data_ptr():
            out.copy_(inp)
        return self._pg.allreduce([out], _OPS[op])

    def subgroup(self, ranks, timeout: float = 300.0):
        # Made by the members alone, through this group's store: unlike
        # torch.distributed.new_group, ranks outside take no part, and creation is
        # bounded by ``timeout``.
        return self._derived(list(ranks), timeout, "sub")

    def close(self) -> None:
        # Only the groups fmcomm made are fmcomm's to drop; the caller's stays theirs.
        if self._own is not None:
            self._own, self._closed = None, True


def _group_store(pg):
    """The store ``pg``'s ranks met through (the default store for the default group)."""
    store = pg.get_group_store() if hasattr(pg, "get_group_store") else None
    return store if store is not None else dist.distributed_c10d._get_default_store()


def _group_name(pg) -> str:
    return str(getattr(pg, "group_name", "") or "default")


def private_backend(backend: str, store, rank: int, size: int, timeout: float, what: str):
    """A gloo or NCCL group of ``size`` ranks meeting through ``store``, made within ``timeout``.

    Failures come back typed: a rank that never joins is a ``CommTimeoutError``, a
    store that went away (its host rank died) a ``TransportError``.
    """
    span = datetime.timedelta(seconds=timeout)
    try:
        if "nccl" in backend:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = span
            return dist.ProcessGroupNCCL(store, rank, size, opts)
        return dist.ProcessGroupGloo(store, rank, size, span)
    except (RuntimeError, OSError) as e:  # gloo: "connectFullMesh failed"; store: DistNetworkError (a RuntimeError)
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "timeout" in str(e).lower() or "timed out" in str(e).lower() or "connectFullMesh" in str(e):
            raise CommTimeoutError(f"{what}: not every rank joined within {timeout:g} s ({text})",
                                   rank=rank, op="new_group") from e
        raise TransportError(f"{what}: torch.distributed failed while making the group: {text}",
                             rank=rank, op="new_group") from e


def init_default_group(rank: int, world: int, device: str = "cpu", timeout_s: float = 300.0,
                       mpi_comm=None) -> None:
    """Start torch.distributed's default group for a job torch did not launch.

    Rendezvous is torch's env:// (MASTER_ADDR, MASTER_PORT). Under an MPI launcher
    without them, rank 0 picks a free port and tells the others through MPI; the
    address is loopback when every rank runs on one host, else rank 0's host name.
    """
    import os
    import socket

    backend = "nccl" if device == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        if mpi_comm is None:
            raise InitError("torch.distributed rendezvous needs MASTER_ADDR and MASTER_PORT "
                            "(torchrun sets them; under mpiexec fmcomm finds them through MPI)")
        host = socket.gethostname()
        hosts = mpi_comm.allgather(host)
        port = None
        if mpi_comm.Get_rank() == 0:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
        port = mpi_comm.bcast(port, root=0)
        addr = "127.0.0.1" if len(set(hosts)) == 1 else hosts[0]
        os.environ.setdefault("MASTER_ADDR", addr)
        os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
