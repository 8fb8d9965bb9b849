"""fp8 (e4m3 by default, e5m2 as an option) with scales.

Shared scale (the default): before any data moves, the group agrees on
B = max |x| over every rank (one tiny all-reduce MAX, done by the collective).
Contributions are coded with scale s = FMAX / B, so the largest value of any rank
lands on fp8's largest finite value. The owner accumulates in float32, never in
fp8, and codes the sum with s / world: |sum| <= world·B, so that headroom means
the sum cannot overflow either. Both scales are computed from B alone, identically
on every rank, and so never travel.

Per-block scales (``fp8:block=N``): every block of N values has its own scale from
its own max |x|, carried at the head of the payload (float32 each); no agreement is
needed before the exchange, at 4 bytes per block.

Rounding is to nearest, ties to even; a value beyond the range saturates instead of
becoming infinity (e4m3 has none; e5m2 has one, which encode never produces).
"""
from __future__ import annotations

import torch

from . import kernels
from .base import Codec, Compressor, SymmetricCodec, round_up

FMAX = {"e4m3": 448.0, "e5m2": 57344.0}
# A bound this small would give a scale beyond float32: values below ~1e-20 carry
# nothing a gradient needs, so the scale stops here instead of overflowing.
_MAX_SCALE = 2.0 ** 64


def scale_for(bound: float, fmax: float) -> float:
    if not bound > 0.0:
        return 1.0  # all zeros: any scale codes them exactly
    return min(fmax / bound, _MAX_SCALE)


class _SharedScaleCodec(Codec):
    def __init__(self, fmt: str, world: int, bound: float):
        self.fmt = fmt
        s = scale_for(bound, FMAX[fmt])
        self.contribution_scale = torch.tensor([s], dtype=torch.float32)
        self.sum_scale = self.contribution_scale / world

    def _encode(self, c, payload, residual, scale):
        if c.numel():
            kernels.fp8_encode(c, payload, scale.to(c.device), c.numel(), self.fmt, residual)

    def _decode(self, payload, out, scale, accumulate):
        if out.numel():
            kernels.fp8_decode(payload, out, scale.to(out.device), out.numel(), self.fmt, accumulate=accumulate)

    def encode_contribution(self, c, payload, residual):
        self._encode(c, payload, residual, self.contribution_scale)

    def add_contribution(self, payload, acc):
        self._decode(payload, acc, self.contribution_scale, True)

    def encode_sum(self, acc, payload, residual):
        self._encode(acc, payload, residual, self.sum_scale)

    def decode_sum(self, payload, out, divisor=1):
        self._decode(payload, out, self.sum_scale, False)
        if divisor != 1:
            out.div_(divisor)  # the kernel divides by the scale; a second true division cannot fold into it


class _BlockScaleCodec(SymmetricCodec):
    """Payload: ceil(n/block) float32 scales (padded to 8 bytes), then n fp8 codes."""

    def __init__(self, fmt: str, block: int):
        self.fmt, self.block = fmt, block

    def _split(self, payload: torch.Tensor, n: int):
        nb = -(-n // self.block)
        head = round_up(4 * nb)
        return payload[: 4 * nb].view(torch.float32), payload[head: head + n]

    def _encode(self, c, payload, residual):
        n = c.numel()
        scales, codes = self._split(payload, n)
        if n == 0:
            return
        values = c if residual is None else c + residual
        nb = scales.numel()
        padded = torch.zeros(nb * self.block, dtype=torch.float32, device=c.device)
        padded[:n] = values.abs()
        amax = padded.view(nb, self.block).amax(dim=1)
        fmax = FMAX[self.fmt]
        torch.where(amax > 0, (fmax / amax).clamp(max=_MAX_SCALE), torch.ones_like(amax), out=scales)
        kernels.fp8_encode(c, codes, scales, self.block, self.fmt, residual)

    def _decode(self, payload, out, accumulate, divisor=1):
        n = out.numel()
        if n == 0:
            return
        scales, codes = self._split(payload, n)
        kernels.fp8_decode(codes, out, scales, self.block, self.fmt, accumulate=accumulate)
        if divisor != 1:
            out.div_(divisor)  # the kernel divides by each block's scale; a second true division cannot fold in


class FP8Compressor(Compressor):
    def __init__(self, fmt: str = "e4m3", block: int = 0):
        self.fmt, self.block = fmt, block
        self.name = f"fp8:{fmt}" + (f",block={block}" if block else "")
        self.needs_bound = block == 0
        self.elementwise = block == 0  # one shared scale; per-block scales depend on the neighbours

    def payload_bytes(self, n: int) -> int:
        if self.block:
            return round_up(4 * -(-n // self.block)) + n
        return n

    def begin(self, world: int, bound: float) -> Codec:
        if self.block:
            return _BlockScaleCodec(self.fmt, self.block)
        return _SharedScaleCodec(self.fmt, world, bound)
