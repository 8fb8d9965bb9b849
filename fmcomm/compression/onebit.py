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


class _BlockOneBitCodec(SymmetricCodec):
    """Signs plus one scale (mean |value|) per block of ``block`` values.

    Payload: the blocks' float32 scales (padded to 8 bytes), then one bit per value,
    least significant bit first, as the one-scale code lays them out. Written with
    torch's vector ops, whole tensors at a time: no per-block call.
    """

    def __init__(self, block: int):
        self.block = block

    def _layout(self, n: int) -> tuple[int, int]:
        blocks = -(-n // self.block)
        return blocks, _round8(4 * blocks)

    def _encode(self, values, payload, residual):
        n = values.numel()
        if n == 0:
            return
        blocks, head = self._layout(n)
        c = values if residual is None else values + residual
        padded = torch.zeros(blocks * self.block, dtype=torch.float32, device=c.device)
        padded[:n] = c
        counts = torch.full((blocks,), float(self.block), dtype=torch.float64, device=c.device)
        counts[-1] = n - (blocks - 1) * self.block
        scales = (padded.abs().view(blocks, self.block).sum(1, dtype=torch.float64) / counts).float()
        payload[:4 * blocks].view(torch.float32).copy_(scales)
        negative = padded < 0
        weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=c.device)
        bits = (negative.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)
        payload[head:head + -(-n // 8)].copy_(bits[:-(-n // 8)])
        if residual is not None:
            per_value = scales.repeat_interleave(self.block)[:n]
            torch.sub(c, torch.where(negative[:n], -per_value, per_value), out=residual)

    def _decode(self, payload, out, accumulate, divisor=1):
        n = out.numel()
        if n == 0:
            return
        blocks, head = self._layout(n)
        scales = payload[:4 * blocks].view(torch.float32)
        if divisor != 1:
            scales = (scales.double() / divisor).float()  # one rounding, as the one-scale code
        shifts = torch.arange(8, dtype=torch.uint8, device=payload.device)
        bit_set = ((payload[head:head + -(-n // 8)].unsqueeze(1) >> shifts) & 1).view(-1)[:n].bool()
        per_value = scales.repeat_interleave(self.block)[:n]
        d = torch.where(bit_set, -per_value, per_value)
        if accumulate:
            out.add_(d)
        else:
            out.copy_(d)


def _round8(nbytes: int) -> int:
    return nbytes + (-nbytes) % 8


class BlockOneBitCompressor(Compressor):
    """``onebit:block=N``: a scale per block of N values (a multiple of 8), so a chunk
    whose values differ by orders of magnitude (the sparse rows of an embedding) keeps
    each block's own magnitude. 4 bytes more per N values than one bit each."""
    error_feedback = True
    carries_zero = False

    def __init__(self, block: int):
        self.block = block
        self.name = f"onebit:block={block}"

    def payload_bytes(self, n: int) -> int:
        return _round8(4 * -(-n // self.block)) + -(-n // 8)

    def begin(self, world: int, bound: float) -> Codec:
        return _BlockOneBitCodec(self.block)
