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
from .base import Codec, Compressor

_HEAD = 8


class _OneBitCodec(Codec):
    @staticmethod
    def _encode(values, payload, residual):
        scale = kernels.onebit_encode(values, payload[_HEAD:], residual)
        payload[:4].view(torch.float32).fill_(scale)

    @staticmethod
    def _decode(payload, out, accumulate):
        scale = float(payload[:4].view(torch.float32).item()) if out.numel() else 0.0
        kernels.onebit_decode(payload[_HEAD:], out, scale, accumulate=accumulate)

    def encode_contribution(self, c, payload, residual):
        self._encode(c, payload, residual)

    def add_contribution(self, payload, acc):
        self._decode(payload, acc, True)

    def encode_sum(self, acc, payload, residual):
        self._encode(acc, payload, residual)

    def decode_sum(self, payload, out):
        self._decode(payload, out, False)


class OneBitCompressor(Compressor):
    name = "onebit"
    error_feedback = True

    def payload_bytes(self, n: int) -> int:
        return _HEAD + -(-n // 8)

    def begin(self, world: int, bound: float) -> Codec:
        return _OneBitCodec()
