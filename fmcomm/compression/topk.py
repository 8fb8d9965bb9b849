"""Top-k: the k = ceil(ratio·n) values of largest magnitude, as (index, value) pairs.

The exchange is a sparse reduce-scatter, not an all-gather of every rank's pairs.
Each rank picks the top k of each owner's chunk and sends them to that owner (about
8·k·(p-1)/p bytes per rank for k of the whole tensor); the owner adds them up and
picks the top k of its chunk again, with its own (server) residual, for the final
all-gather (another 8·k·(p-1)/p). The all-gather of every rank's pairs would send
8·k·(p-1) bytes per rank, more than this from three ranks up, and would leave every
rank adding p sparse sets; here each payload has a fixed size, so nothing is
exchanged about sizes either.

Error feedback at both levels as for 1-bit: what a rank or an owner does not send
this step stays in its residual and is added to the next step's values. Selection
is exact: ties in |value| go to the lower index, so every implementation picks the
same set. Payload: k int32 chunk-local indices (increasing), then k float32 values.
"""
from __future__ import annotations

import math

import torch

from . import kernels
from .base import Codec, Compressor, SymmetricCodec


def k_for(ratio: float, n: int) -> int:
    if n == 0:
        return 0
    # 1e-9 keeps ratio·n that is an integer in exact arithmetic (0.01·300) from
    # rounding up to the next one in floating point.
    return min(n, max(1, math.ceil(ratio * n - 1e-9)))


class _TopKCodec(SymmetricCodec):
    def __init__(self, ratio: float):
        self.ratio = ratio

    def _pairs(self, payload, n):
        k = k_for(self.ratio, n)
        return payload[: 4 * k].view(torch.int32), payload[4 * k: 8 * k].view(torch.float32)

    def _encode(self, values, payload, residual):
        idx, val = self._pairs(payload, values.numel())
        kernels.topk_select(values, idx.numel(), idx, val, residual)

    def _decode(self, payload, out, accumulate, divisor=1):
        if not accumulate:
            out.zero_()  # a sum's values not sent are zero
        idx, val = self._pairs(payload, out.numel())
        # Indices are distinct, so each value is added to a zero once: dividing the k
        # values first gives what dividing the whole output after would.
        kernels.scatter_add(idx, val / divisor if divisor != 1 else val, out)


class TopKCompressor(Compressor):
    error_feedback = True

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.name = f"topk:{ratio:g}"

    def payload_bytes(self, n: int) -> int:
        return 8 * k_for(self.ratio, n)

    def begin(self, world: int, bound: float) -> Codec:
        return _TopKCodec(self.ratio)
