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

    @abc.abstractmethod
    def byte_view(self, t: torch.Tensor) -> Any:
        """The memory of flat tensor ``t`` as a sliceable byte buffer this engine sends from.

        Raises UnsupportedError if the engine cannot reach that memory (a CUDA tensor
        on an MPI that is not CUDA-aware, a CPU tensor on NCCL).
        """

    @abc.abstractmethod
    def isend(self, peer: int, buf: Any, tag: int) -> Any:
        """Start sending ``buf`` (a slice of a byte_view) to ``peer``; returns a request."""

    @abc.abstractmethod
    def irecv(self, peer: int, buf: Any, tag: int) -> Any:
        """Start receiving exactly ``len(buf)`` bytes from ``peer`` into ``buf`` (a slice of a byte_view)."""

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

    def native_all_to_all(self, inp: torch.Tensor, out: torch.Tensor, send_counts: Sequence[int],
                          recv_counts: Sequence[int]) -> Any:
        """Start the engine's all-to-all (counts in elements, blocks back to back); returns a request."""
        from ..errors import UnsupportedError
        raise UnsupportedError(f"the {self.name} transport has no native all-to-all")

    def subgroup(self, ranks: Sequence[int], timeout: float = 300.0) -> "Transport | None":
        """A transport over ``ranks`` of this one (None on ranks outside); every rank calls it.

        ``timeout``: seconds the members may take to meet, where the engine can bound it."""
        from ..errors import UnsupportedError
        raise UnsupportedError(f"the {self.name} transport cannot make sub-groups")

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the transport created (not what it was handed)."""
