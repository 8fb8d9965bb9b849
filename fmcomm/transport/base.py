"""The narrow interface every engine implements.

Point-to-point: post a send or a receive of a flat byte buffer (a 1-D uint8 tensor)
and wait for a group of them until a deadline. Collective: the engine's own
all-reduce, used by the ``native`` algorithm and by the argument check. A transport
moves bytes; it never chooses an algorithm. Timeouts are reported as a False return
from :meth:`Transport.wait`, so the executor, which knows the operation, its sequence
number and the peer, raises the error.
"""
from __future__ import annotations

import abc
from typing import Any, Sequence

import torch

from ..dtypes import DType


class Transport(abc.ABC):
    name: str
    rank: int
    world: int
    # True where a message longer than the receive posted for it fails that receive
    # (MPI: MPI_ERR_TRUNCATE) instead of corrupting memory or killing the process.
    reports_size_mismatch: bool = False

    @abc.abstractmethod
    def isend(self, peer: int, buf: torch.Tensor, tag: int) -> Any:
        """Start sending ``buf`` (contiguous uint8) to ``peer``; returns a request."""

    @abc.abstractmethod
    def irecv(self, peer: int, buf: torch.Tensor, tag: int) -> Any:
        """Start receiving exactly ``buf.numel()`` bytes from ``peer`` into ``buf``."""

    @abc.abstractmethod
    def wait(self, requests: Sequence[Any], deadline: float) -> bool:
        """Wait until all ``requests`` complete; False if ``deadline`` (time.monotonic) passed first."""

    @abc.abstractmethod
    def supports_native(self, collective: str, dtype: DType, op: str, device: str) -> bool:
        """Whether :meth:`native_all_reduce` can run this combination."""

    @abc.abstractmethod
    def native_all_reduce(self, inp: torch.Tensor, out: torch.Tensor, dtype: DType, op: str) -> Any:
        """Start the engine's all-reduce of ``inp`` into ``out`` (``out`` may be ``inp``); returns a request.

        ``op`` is sum, prod, min or max: avg is sum followed by the executor's division.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the transport created (not what it was handed)."""
