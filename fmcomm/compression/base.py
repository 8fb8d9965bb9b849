"""What every compressor provides.

A compressed all-reduce has two coding stages, and a compressor codes each one:

* **contribution**: each rank encodes its own values (after adding its worker
  residual, for families with error feedback); the chunk's owner decodes every
  other rank's payload and accumulates them, with its own values uncoded
  (:meth:`Codec.add_own`), in float32, in rank order;
* **sum**: the owner encodes the accumulated chunk (after adding its server
  residual), and every rank decodes that one payload into its output.

:meth:`Compressor.begin` returns the :class:`Codec` of one call, given what every
rank agreed on before any data moved (the group size and, for families that need
one, a bound on |x| over all ranks). Payload sizes depend only on the element count,
so every rank knows every payload's size without being told.
"""
from __future__ import annotations

import abc

import torch


class Codec(abc.ABC):
    """The coding of one call; the four methods of the two stages."""

    @abc.abstractmethod
    def encode_contribution(self, c: torch.Tensor, payload: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Encode this rank's values ``c`` into ``payload`` (uint8); update ``residual`` if given."""

    @abc.abstractmethod
    def add_contribution(self, payload: torch.Tensor, acc: torch.Tensor) -> None:
        """acc += decoded ``payload`` (float32)."""

    @abc.abstractmethod
    def encode_sum(self, acc: torch.Tensor, payload: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Encode an owner's accumulated chunk; update the server ``residual`` if given."""

    @abc.abstractmethod
    def decode_sum(self, payload: torch.Tensor, out: torch.Tensor, divisor: int = 1) -> None:
        """out = decoded sum ``payload`` / ``divisor`` (every rank decodes the same bytes the same way).

        ``divisor`` is the group size where the caller averages. The result is the one
        dividing the decoded sum afterwards would give; codecs that can get it in the
        decode itself do, which saves the output a second pass through memory.
        """

    def add_own(self, c: torch.Tensor, acc: torch.Tensor, residual: torch.Tensor | None) -> None:
        """acc += the owner's own values ``c``, uncoded, in the scale of decoded contributions.

        The owner's share of its own chunk never crosses a link, so coding it would
        lose precision and save nothing. A worker ``residual`` still held there (a
        checkpoint from before owners kept their values uncoded) is added once and
        cleared.
        """
        acc.add_(c)
        if residual is not None:
            acc.add_(residual)
            residual.zero_()


class SymmetricCodec(Codec):
    """A codec whose two stages code alike: subclasses give one encode and one decode."""

    @abc.abstractmethod
    def _encode(self, values: torch.Tensor, payload: torch.Tensor, residual: torch.Tensor | None) -> None:
        ...

    @abc.abstractmethod
    def _decode(self, payload: torch.Tensor, out: torch.Tensor, accumulate: bool, divisor: int = 1) -> None:
        """out (+)= decoded ``payload``, divided by ``divisor`` (only where not accumulating)."""

    def encode_contribution(self, c, payload, residual):
        self._encode(c, payload, residual)

    def add_contribution(self, payload, acc):
        self._decode(payload, acc, True)

    def encode_sum(self, acc, payload, residual):
        self._encode(acc, payload, residual)

    def decode_sum(self, payload, out, divisor=1):
        self._decode(payload, out, False, divisor)


class Compressor(abc.ABC):
    name: str = ""
    error_feedback: bool = False  # keeps a worker and a server residual between calls
    needs_bound: bool = False     # begin() needs max |x| over every rank's input
    # Each value's code depends on that value and on numbers every rank agreed on
    # only, so the result is the same in any order of the values (callers that
    # reorder values for a stable layout need not).
    elementwise: bool = False
    # A zero decodes as a zero (every code but a sign's: 1-bit sends +-scale for it).
    carries_zero: bool = True

    @abc.abstractmethod
    def payload_bytes(self, n: int) -> int:
        """Bytes of the payload of ``n`` values (the same in both stages)."""

    @abc.abstractmethod
    def begin(self, world: int, bound: float) -> Codec:
        """The codec for one call over ``world`` ranks; ``bound`` = max |x| if needs_bound."""

    def __repr__(self) -> str:
        return f"<compressor {self.name}>"


def round_up(n: int, to: int = 8) -> int:
    return -(-n // to) * to
