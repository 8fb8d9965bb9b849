"""1-bit: the sign of every value and one scale (the mean |value|) per chunk.

As in DeepSpeed's compressed all-reduce (1-bit Adam), error feedback works at two
levels: each rank adds its *worker* residual before coding its contribution and
keeps what the code lost; each chunk's owner adds its *server* residual before coding
the sum. What is lost at either level is sent in a later step, so over many steps the
running sum of results tracks the running sum of true values (their difference is
exactly the residuals still held, which stay bounded). Payload: the float32 scale
(padded to 8 bytes), then one bit per value, least significant bit first.
"""
from __future__ import annotations

import torch

from . import kernels
from .base import Codec, Compressor, SymmetricCodec

_HEAD = 8


class _OneBitCodec(SymmetricCodec):
    def _encode(self, values, payload, residual):
        scale = kernels.onebit_encode(values, payload[_HEAD:], residual)
        payload[:4].view(torch.float32).fill_(scale)

    def _decode(self, payload, out, accumulate, divisor=1):
        scale = float(payload[:4].view(torch.float32).item()) if out.numel() else 0.0
        # Every value decodes to +-scale, so +-scale/divisor, rounded to float32 once
        # (onebit_decode rounds it; a double quotient rounded to float32 is the float32
        # quotient), is what dividing each decoded value would give.
        kernels.onebit_decode(payload[_HEAD:], out, scale / divisor, accumulate=accumulate)


class OneBitCompressor(Compressor):
    name = "onebit"
    error_feedback = True
    carries_zero = False

    def payload_bytes(self, n: int) -> int:
        return _HEAD + -(-n // 8)

    def begin(self, world: int, bound: float) -> Codec:
        return _OneBitCodec()
