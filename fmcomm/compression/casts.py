"""fp16 and bf16: plain casts, as PyTorch's fp16/bf16 compression hooks.

Each rank divides by the group size before casting (PyTorch's hooks do the same), so
the owner's sum is an average that fits the narrow type however many ranks add up;
the final decode multiplies back, or, where the caller averages over those same
ranks, keeps the payload's average as it is (value·world/world in float32 is the
value exactly: the narrow types' mantissas leave room for the product). Values
beyond the type's range saturate to its largest finite value instead of becoming
infinity.
"""
from __future__ import annotations

import torch

from .base import Codec, Compressor

_TYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class _CastCodec(Codec):
    def __init__(self, dtype: torch.dtype, world: int):
        self.dtype, self.world = dtype, world
        self.limit = torch.finfo(dtype).max

    def _cast(self, values: torch.Tensor, payload: torch.Tensor) -> None:
        narrow = payload.view(self.dtype)
        narrow.copy_(torch.clamp(values, -self.limit, self.limit))

    def encode_contribution(self, c, payload, residual):
        self._cast(c / self.world if self.world > 1 else c, payload)

    def add_contribution(self, payload, acc):
        acc.add_(payload.view(self.dtype))

    def add_own(self, c, acc, residual):
        acc.add_(c / self.world if self.world > 1 else c)

    def encode_sum(self, acc, payload, residual):
        self._cast(acc, payload)

    def decode_sum(self, payload, out, divisor=1):
        out.copy_(payload.view(self.dtype))
        if divisor == self.world:
            return  # the payload is already the average
        if self.world > 1:
            out.mul_(self.world)
        if divisor != 1:
            out.div_(divisor)


class CastCompressor(Compressor):
    elementwise = True

    def __init__(self, kind: str):
        self.name, self.dtype = kind, _TYPES[kind]

    def payload_bytes(self, n: int) -> int:
        return 2 * n

    def begin(self, world: int, bound: float) -> Codec:
        return _CastCodec(self.dtype, world)
