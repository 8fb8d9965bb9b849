"""torch.distributed point-to-point: gloo on CPU, NCCL on GPU.

Runs over a process group the caller made (or the default group). Waits use
``Work.wait(timeout)``, which blocks in C++ with the GIL released.
"""
from __future__ import annotations

import datetime
import time
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..dtypes import DType
from ..errors import InitError, UnsupportedError
from .base import Transport

_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT,
        "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class TorchTransport(Transport):
    name = "torch"

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise InitError("transport 'torch' needs an initialized torch.distributed process group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group)).lower()
        # Group-relative ranks are what schedules use; torch p2p wants global ranks.
        self._global = [dist.get_global_rank(group, r) if group is not None else r for r in range(self.world)]

    def byte_view(self, t: torch.Tensor) -> Any:
        on_gpu = t.device.type == "cuda"
        if on_gpu and "nccl" not in self.backend:
            raise UnsupportedError(f"backend {self.backend} cannot move {t.device} tensors point to point")
        if not on_gpu and self.backend == "nccl":
            raise UnsupportedError("backend nccl cannot move CPU tensors; use a gloo group")
        return t.view(torch.uint8)

    def isend(self, peer: int, buf: Any, tag: int) -> Any:
        return dist.isend(buf, self._global[peer], group=self.group, tag=tag)

    def irecv(self, peer: int, buf: Any, tag: int) -> Any:
        return dist.irecv(buf, self._global[peer], group=self.group, tag=tag)

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
        return dist.all_to_all_single(out, inp, output_split_sizes=list(recv_counts),
                                      input_split_sizes=list(send_counts), group=self.group, async_op=True)

    def native_all_reduce(self, inp: torch.Tensor, out: torch.Tensor, dtype: DType, op: str) -> Any:
        if inp.data_ptr() != out.data_ptr():
            out.copy_(inp)
        return dist.all_reduce(out, op=_OPS[op], group=self.group, async_op=True)

    def subgroup(self, ranks):
        # torch.distributed.new_group must be called by every process of the default
        # group, members or not; fmcomm's new_group is called by every rank of this one,
        # which is the default group when this transport runs on it.
        group = dist.new_group([self._global[r] for r in ranks])
        return TorchTransport(group) if self.rank in ranks else None

    def close(self) -> None:
        pass  # the process group belongs to the caller


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
