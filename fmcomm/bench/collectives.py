"""Benchmark descriptors: one small object per collective.

A descriptor says how many elements a message of S bytes holds, how each rank fills
its input so the exact result is known, what that result is, the bus-bandwidth factor
(nccl-tests' doc/PERFORMANCE.md: busbw = algbw x factor, so busbw compares with link
speed), and how each implementation runs it. Inputs are small integers (sum, avg,
min, max) or +-1 and 2 (prod), exact in every dtype down to bfloat16 at these world
sizes, so a correct result is bit-exact and any difference is a wrong element.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..dtypes import DType


def _index(count: int) -> torch.Tensor:
    return torch.arange(count, dtype=torch.int64)


def all_reduce_input(rank: int, world: int, count: int, dtype: DType, op: str) -> torch.Tensor:
    i = _index(count)
    if op == "prod":
        v = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)[(i + rank) % 3]
    elif op in ("min", "max"):
        v = ((i * 3 + rank * 7) % 11 - 5).double()
    else:
        v = ((i * 3 + rank * 7) % 5 - 2).double()
    return v.to(dtype.torch)


def all_reduce_expected(world: int, count: int, dtype: DType, op: str) -> torch.Tensor:
    xs = torch.stack([all_reduce_input(r, world, count, dtype, op).double() for r in range(world)])
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


@dataclasses.dataclass(frozen=True)
class Collective:
    name: str
    busbw_factor: Callable[[int], float]
    count_for_bytes: Callable[[int, int, int], int]  # (nbytes, itemsize, world) -> elements per rank
    make_input: Callable[[int, int, int, DType, str], torch.Tensor]
    expected: Callable[[int, int, DType, str], torch.Tensor]
    has_redop: bool = True


COLLECTIVES = {
    "all_reduce": Collective(
        name="all_reduce",
        # Each rank sends and receives 2(n-1)/n of the buffer in a bandwidth-optimal algorithm.
        busbw_factor=lambda n: 2.0 * (n - 1) / n if n > 1 else 0.0,
        count_for_bytes=lambda nbytes, itemsize, world: nbytes // itemsize,
        make_input=all_reduce_input,
        expected=all_reduce_expected,
    ),
}
