"""Benchmark descriptors: one small object per collective.

A descriptor says how a message of S bytes maps to buffers (nccl-tests' conventions:
S is the larger of the two buffers for all_gather and reduce_scatter, the whole
buffer for all_to_all), how each rank fills its input so the exact result is known,
what each rank's result must be, the bus-bandwidth factor (nccl-tests'
doc/PERFORMANCE.md: busbw = algbw x factor, so busbw compares with link speed), which
placements exist (out of place, in place) and how each implementation runs it.
Inputs are small integers (sum, avg, min, max) or +-1 and 2 (prod), exact in every
dtype down to bfloat16 at these world sizes, so a correct result is bit-exact.

A run is ``run(inp, out, inplace)``; in place, ``out`` holds the data.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..dtypes import DType
from ..errors import UnsupportedError

ROOT = 0  # broadcast and reduce root, as nccl-tests' default


def values(rank: int, count: int, dtype: DType, op: str, salt: int = 0) -> torch.Tensor:
    i = torch.arange(count, dtype=torch.int64) + salt
    if op == "prod":
        v = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)[(i + rank) % 3]
    elif op in ("min", "max"):
        v = ((i * 3 + rank * 7) % 11 - 5).double()
    else:
        v = ((i * 3 + rank * 7) % 5 - 2).double()
    return v.to(dtype.torch)


def reduced(world: int, count: int, dtype: DType, op: str, salt: int = 0) -> torch.Tensor:
    xs = torch.stack([values(r, count, dtype, op, salt).double() for r in range(world)])
    if op in ("sum", "avg"):
        res = xs.sum(0)
    elif op == "prod":
        res = xs.prod(0)
    elif op == "min":
        res = xs.min(0).values
    else:
        res = xs.max(0).values
    res = res.to(dtype.torch)
    if op == "avg" and world > 1:
        # The one rounding step of avg, done as the implementations do it.
        res = res.div(world) if dtype.is_float else res.div(world, rounding_mode="trunc")
    return res


def avg_in_place(t: torch.Tensor, world: int) -> None:
    if t.is_floating_point():
        t.div_(world)
    else:
        t.div_(world, rounding_mode="trunc")


@dataclasses.dataclass(frozen=True)
class Collective:
    name: str
    busbw_factor: Callable[[int], float]
    # (nbytes, itemsize, world) -> (count per rank, input elements, output elements, reported bytes)
    shape: Callable[[int, int, int], tuple[int, int, int, int]]
    make_input: Callable[[int, int, int, DType, str], torch.Tensor]  # (rank, world, count, dtype, op)
    expected: Callable[[int, int, int, DType, str], torch.Tensor]  # (rank, world, count, dtype, op)
    placements: tuple[bool, ...]  # False: out of place, True: in place
    fmcomm: Callable  # (comm, algo, op) -> run
    mpi: Callable  # (ctl, dtype, op) -> run
    torch: Callable  # (world, op) -> run
    has_redop: bool = True


def _mpi_type(ctl, dtype: DType):
    MPI = ctl.MPI
    name = {"float32": "FLOAT", "float64": "DOUBLE", "int32": "INT32_T", "int64": "INT64_T",
            "float16": "FLOAT16_T", "bfloat16": "BFLOAT16_T"}[dtype.name]
    t = getattr(MPI, name, MPI.DATATYPE_NULL)
    if t == MPI.DATATYPE_NULL:
        raise UnsupportedError(f"this MPI has no {dtype.name} type")
    return t


def _mpi_op(ctl, op: str):
    MPI = ctl.MPI
    return {"sum": MPI.SUM, "avg": MPI.SUM, "prod": MPI.PROD, "min": MPI.MIN, "max": MPI.MAX}[op]


def _np(t: torch.Tensor, mtype):
    return [t.view(torch.uint8).numpy(), t.numel(), mtype]


def _torch_op(op: str):
    import torch.distributed as dist
    return {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT,
            "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]


def _torch_call(fn):
    """gloo lacks some collectives and dtypes; its RuntimeError becomes 'unavailable'."""
    def run(inp, out, inplace):
        try:
            fn(inp, out, inplace)
        except RuntimeError as e:
            raise UnsupportedError(f"torch.distributed: {str(e).splitlines()[0]}") from None
    return run


# ---------------------------------------------------------------- all_reduce

def _ar_fmcomm(comm, algo, op):
    def run(inp, out, inplace):
        if inplace:
            comm.all_reduce(out, op=op, algo=algo)
        else:
            comm.all_reduce(inp, op=op, algo=algo, output=out)
    return run


def _ar_mpi(ctl, dtype, op):
    mtype, mop = _mpi_type(ctl, dtype), _mpi_op(ctl, op)

    def run(inp, out, inplace):
        ctl.comm.Allreduce(ctl.MPI.IN_PLACE if inplace else _np(inp, mtype), _np(out, mtype), op=mop)
        if op == "avg":
            avg_in_place(out, ctl.world)
    return run


def _ar_torch(world, op):
    import torch.distributed as dist

    def fn(inp, out, inplace):
        # torch's all_reduce is in place only: out of place is a copy, then the in-place call.
        if not inplace:
            out.copy_(inp)
        dist.all_reduce(out, op=_torch_op(op))
        if op == "avg":
            avg_in_place(out, world)
    return _torch_call(fn)


# ------------------------------------------------------------ reduce_scatter

def _rs_fmcomm(comm, algo, op):
    return lambda inp, out, inplace: comm.reduce_scatter(out, inp, op=op, algo=algo)


def _rs_mpi(ctl, dtype, op):
    mtype, mop = _mpi_type(ctl, dtype), _mpi_op(ctl, op)

    def run(inp, out, inplace):
        ctl.comm.Reduce_scatter([inp.view(torch.uint8).numpy(), inp.numel(), mtype],
                                [out.view(torch.uint8).numpy(), out.numel(), mtype],
                                recvcounts=[out.numel()] * ctl.world, op=mop)
        if op == "avg":
            avg_in_place(out, ctl.world)
    return run


def _rs_torch(world, op):
    import torch.distributed as dist

    def fn(inp, out, inplace):
        dist.reduce_scatter_tensor(out, inp, op=_torch_op(op))
        if op == "avg":
            avg_in_place(out, world)
    return _torch_call(fn)


# ---------------------------------------------------------------- all_gather

def _ag_mpi(ctl, dtype, op):
    mtype = _mpi_type(ctl, dtype)
    return lambda inp, out, inplace: ctl.comm.Allgather(_np(inp, mtype), [out.view(torch.uint8).numpy(), mtype])


def _ag_torch(world, op):
    import torch.distributed as dist
    return _torch_call(lambda inp, out, inplace: dist.all_gather_into_tensor(out, inp))


# ------------------------------------------------------- broadcast and reduce

def _bc_mpi(ctl, dtype, op):
    mtype = _mpi_type(ctl, dtype)
    return lambda inp, out, inplace: ctl.comm.Bcast(_np(out, mtype), root=ROOT)


def _rd_mpi(ctl, dtype, op):
    mtype, mop = _mpi_type(ctl, dtype), _mpi_op(ctl, op)

    def run(inp, out, inplace):
        if ctl.rank == ROOT:
            ctl.comm.Reduce(ctl.MPI.IN_PLACE, _np(out, mtype), op=mop, root=ROOT)
            if op == "avg":
                avg_in_place(out, ctl.world)
        else:
            ctl.comm.Reduce(_np(out, mtype), None, op=mop, root=ROOT)
    return run


def _rd_torch(world, op):
    import torch.distributed as dist

    def fn(inp, out, inplace):
        keep = out.clone() if dist.get_rank() != ROOT else None
        dist.reduce(out, dst=ROOT, op=_torch_op(op))
        if keep is not None:
            out.copy_(keep)  # gloo may leave partial sums in non-root buffers
        elif op == "avg":
            avg_in_place(out, world)
    return _torch_call(fn)


def _rd_expected(rank, world, count, dtype, op):
    return reduced(world, count, dtype, op) if rank == ROOT else values(rank, count, dtype, op)


# ---------------------------------------------------------------- all_to_all

def _a2a_mpi(ctl, dtype, op):
    mtype = _mpi_type(ctl, dtype)

    def run(inp, out, inplace):
        n = inp.numel() // ctl.world
        counts, displs = [n] * ctl.world, [n * j for j in range(ctl.world)]
        ctl.comm.Alltoallv([inp.view(torch.uint8).numpy(), (counts, displs), mtype],
                           [out.view(torch.uint8).numpy(), (counts, displs), mtype])
    return run


def _a2a_expected(rank, world, count, dtype, op):
    # Rank i's input is values(i, world*count); rank r receives block r of each rank's.
    return torch.cat([values(i, world * count, dtype, "sum")[rank * count:(rank + 1) * count]
                      for i in range(world)])


_SHAPES = {
    "same": lambda nbytes, isz, world: (nbytes // isz, nbytes // isz, nbytes // isz, nbytes // isz * isz),
    "gather": lambda nbytes, isz, world: ((nbytes // isz) // world, (nbytes // isz) // world,
                                          (nbytes // isz) // world * world, (nbytes // isz) // world * world * isz),
    "scatter": lambda nbytes, isz, world: ((nbytes // isz) // world, (nbytes // isz) // world * world,
                                           (nbytes // isz) // world, (nbytes // isz) // world * world * isz),
    "exchange": lambda nbytes, isz, world: ((nbytes // isz) // world, (nbytes // isz) // world * world,
                                            (nbytes // isz) // world * world, (nbytes // isz) // world * world * isz),
}

COLLECTIVES = {c.name: c for c in (
    Collective(
        "all_reduce", lambda n: 2.0 * (n - 1) / n if n > 1 else 0.0, _SHAPES["same"],
        lambda rank, world, count, dtype, op: values(rank, count, dtype, op),
        lambda rank, world, count, dtype, op: reduced(world, count, dtype, op),
        (False, True), _ar_fmcomm, _ar_mpi, _ar_torch),
    Collective(
        "reduce_scatter", lambda n: (n - 1) / n if n > 1 else 0.0, _SHAPES["scatter"],
        lambda rank, world, count, dtype, op: values(rank, world * count, dtype, op),
        lambda rank, world, count, dtype, op: reduced(world, world * count, dtype, op)[rank * count:(rank + 1) * count],
        (False,), _rs_fmcomm, _rs_mpi, _rs_torch),
    Collective(
        "all_gather", lambda n: (n - 1) / n if n > 1 else 0.0, _SHAPES["gather"],
        lambda rank, world, count, dtype, op: values(rank, count, dtype, "sum"),
        lambda rank, world, count, dtype, op: torch.cat([values(r, count, dtype, "sum") for r in range(world)]),
        (False,), lambda comm, algo, op: (lambda inp, out, inplace: comm.all_gather(out, inp, algo=algo)),
        _ag_mpi, _ag_torch, has_redop=False),
    Collective(
        "broadcast", lambda n: 1.0, _SHAPES["same"],
        lambda rank, world, count, dtype, op: values(rank, count, dtype, "sum"),
        lambda rank, world, count, dtype, op: values(ROOT, count, dtype, "sum"),
        (True,), lambda comm, algo, op: (lambda inp, out, inplace: comm.broadcast(out, ROOT, algo=algo)),
        _bc_mpi, lambda world, op: _torch_call(
            lambda inp, out, inplace: __import__("torch.distributed").distributed.broadcast(out, src=ROOT)),
        has_redop=False),
    Collective(
        "reduce", lambda n: 1.0, _SHAPES["same"],
        lambda rank, world, count, dtype, op: values(rank, count, dtype, op), _rd_expected,
        (True,), lambda comm, algo, op: (lambda inp, out, inplace: comm.reduce(out, ROOT, op=op, algo=algo)),
        _rd_mpi, _rd_torch),
    Collective(
        "all_to_all", lambda n: (n - 1) / n if n > 1 else 0.0, _SHAPES["exchange"],
        lambda rank, world, count, dtype, op: values(rank, world * count, dtype, "sum"), _a2a_expected,
        (False,), lambda comm, algo, op: (lambda inp, out, inplace: comm.all_to_all_single(out, inp, algo=algo)),
        _a2a_mpi, lambda world, op: _torch_call(
            lambda inp, out, inplace: __import__("torch.distributed").distributed.all_to_all_single(out, inp)),
        has_redop=False),
)}
