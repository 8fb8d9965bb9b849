"""MPI through mpi4py.

CPU tensors go to MPI as NumPy views of their memory (no copy). CUDA tensors go as
themselves (mpi4py reads ``__cuda_array_interface__``) where the MPI library says it is
CUDA-aware, and are refused otherwise. Requests are polled with ``Testall`` so that a
wait can end at a deadline: MPI's own waits cannot time out.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch

from ..dtypes import DType
from ..errors import InitError, UnsupportedError
from .base import Transport

try:
    from mpi4py import MPI
    MPI_IMPORT_ERROR: str | None = None
except ImportError as e:  # MPI is an optional extra
    MPI = None
    MPI_IMPORT_ERROR = str(e)

# Polls without yielding before the waiter starts calling sched_yield: the first
# polls catch messages already on their way, yielding afterwards lets a peer that
# shares this core run and send. With more local ranks than cores every poll yields:
# measured here, a spinning 4-rank job on 2 cores took 5 ms for a 128-byte
# Iallreduce, a yielding one 29 us.
_SPIN_POLLS = 200


class MPITransport(Transport):
    name = "mpi"

    def __init__(self, comm=None):
        if MPI is None:
            raise InitError(f"transport 'mpi' needs mpi4py ({MPI_IMPORT_ERROR}); pip install mpi4py mpich")
        base = MPI.COMM_WORLD if comm is None else comm
        # A private communicator: fmcomm's messages never match the caller's.
        self.comm = base.Dup()
        self.rank, self.world = self.comm.Get_rank(), self.comm.Get_size()
        self.cuda_aware = self._query_cuda_aware()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_world = local.Get_size()
        local.Free()
        self._spin = 0 if self.local_world > (os.cpu_count() or 1) else _SPIN_POLLS
        self._ops = {"sum": MPI.SUM, "prod": MPI.PROD, "min": MPI.MIN, "max": MPI.MAX}
        self._types = {
            "float32": MPI.FLOAT, "float64": MPI.DOUBLE, "int32": MPI.INT32_T, "int64": MPI.INT64_T,
            "float16": getattr(MPI, "FLOAT16_T", MPI.DATATYPE_NULL),
            "bfloat16": getattr(MPI, "BFLOAT16_T", MPI.DATATYPE_NULL),
        }

    @staticmethod
    def _query_cuda_aware() -> bool:
        query = getattr(MPI, "Query_cuda_support", None)
        try:
            return bool(query()) if query else False
        except Exception:  # noqa: BLE001 - an MPI without the query is not CUDA-aware for us
            return False

    def byte_view(self, t: torch.Tensor) -> Any:
        if t.is_cuda:
            if not self.cuda_aware:
                raise UnsupportedError(f"MPI library is not CUDA-aware; cannot move a {t.device} tensor "
                                       f"(use FMCOMM_TRANSPORT=torch for NCCL)")
            return t.view(torch.uint8)
        return t.view(torch.uint8).numpy()

    def isend(self, peer: int, buf: Any, tag: int) -> Any:
        return self.comm.Isend([buf, MPI.BYTE], peer, tag)

    def irecv(self, peer: int, buf: Any, tag: int) -> Any:
        return self.comm.Irecv([buf, MPI.BYTE], peer, tag)

    def wait(self, requests: Sequence[Any], deadline: float) -> bool:
        if not requests:
            return True
        reqs = list(requests)
        polls = 0
        while not MPI.Request.Testall(reqs):
            polls += 1
            if polls > self._spin:
                os.sched_yield()
                if polls % 64 == 0 and time.monotonic() > deadline:
                    return False
        return True

    def supports_native(self, collective: str, dtype: DType, op: str, device: str) -> bool:
        if device != "cpu" and not self.cuda_aware:
            return False
        if collective == "all_to_all":
            return True  # moves bytes: every dtype
        if collective != "all_reduce":
            return False
        return self._types[dtype.name] != MPI.DATATYPE_NULL and op in ("sum", "avg", "prod", "min", "max")

    def native_all_to_all(self, inp, out, send_counts, recv_counts) -> Any:
        isz = inp.element_size()

        def layout(counts):
            nbytes = [c * isz for c in counts]
            return nbytes, [sum(nbytes[:j]) for j in range(len(nbytes))]
        return self.comm.Ialltoallv([self.byte_view(inp), layout(send_counts), MPI.BYTE],
                                    [self.byte_view(out), layout(recv_counts), MPI.BYTE])

    def native_all_reduce(self, inp: torch.Tensor, out: torch.Tensor, dtype: DType, op: str) -> Any:
        mpi_type = self._types[dtype.name]
        recv = [self.byte_view(out), out.numel(), mpi_type]
        send = MPI.IN_PLACE if inp.data_ptr() == out.data_ptr() else [self.byte_view(inp), inp.numel(), mpi_type]
        return self.comm.Iallreduce(send, recv, self._ops["sum" if op == "avg" else op])

    def subgroup(self, ranks, timeout: float = 300.0):
        # MPI_Comm_split has no timeout of its own: a rank that never joins holds it.
        index = {r: i for i, r in enumerate(ranks)}
        color = 0 if self.rank in index else MPI.UNDEFINED
        part = self.comm.Split(color, index.get(self.rank, 0))
        if part == MPI.COMM_NULL:
            return None
        sub = MPITransport(part)
        part.Free()
        return sub

    def close(self) -> None:
        if self.comm is not None and MPI is not None and not MPI.Is_finalized():
            self.comm.Free()
        self.comm = None
