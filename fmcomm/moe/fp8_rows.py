"""fp8 e4m3 rows with one float32 scale per row, packed into int32 words for the wire.

A row of H values becomes H one-byte codes (padded to a multiple of 4 bytes) followed by
its scale, so one row is one unit that permutations and the all-to-all move whole:
``ceil(H/4) + 1`` int32 words, 25.1% of float32's bytes at H = 1,024.

Coding: s = 448 / max|x| over the row (448 is e4m3's largest finite value; an all-zero
row takes s = 1), code = e4m3(x·s) rounded to nearest even, saturating; decoding
divides by s (the encode and decode kernels of ``fmcomm.compression``).

Error bound, per value x of a row with largest magnitude m:
    |decoded − x| ≤ 2^-4·|x| + 2^-10·m/448  (+ 2^-22·|x| of float32 rounding)
e4m3 has 3 mantissa bits: where x·s is normal (≥ 2^-6) rounding to nearest is off by at
most half a unit in the last place, 2^-4 of the value; below that (subnormal codes,
spacing 2^-9) it is off by at most 2^-10 in the scaled unit, 2^-10/s = 2^-10·m/448.
The scale's own product and quotient add a few float32 roundings. (Where m < ~1e-17
the scale is capped at 2^64, as the compressors cap theirs, and 2^-10/s is 2^-74.) Inputs of another
float dtype are coded from float32 and decoded back to it (one more rounding of that
dtype).
"""
from __future__ import annotations

import torch

from ..compression import kernels
from ..compression.fp8 import _MAX_SCALE, FMAX

FORMAT = "e4m3"


def words_per_row(hidden: int) -> int:
    return -(-hidden // 4) + 1


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """s per row of float32 ``x`` ([n, H]): 448 / max|x|, 1 for an all-zero row."""
    if not (x.shape[0] and x.shape[1]):
        return torch.ones(x.shape[0])
    # max |x| from the row's min and max: no temporary of x's size (abs() would make one),
    # and 1.3-1.6x faster than abs().amax() on 64 MiB here.
    low, high = torch.aminmax(x, dim=1)
    largest = torch.maximum(high, -low)
    scales = torch.where(largest > 0, FMAX[FORMAT] / largest, torch.ones_like(largest))
    # As the compressors' scale_for: a row below ~1e-20 would need a scale beyond float32.
    return scales.clamp(max=_MAX_SCALE).contiguous()


def error_bound(x: torch.Tensor) -> torch.Tensor:
    """The bound above for every value of ``x`` ([rows, H]); 2^-10/s is 2^-10·m/448 unless s was capped."""
    x = x.to(torch.float32)
    return (2.0 ** -4 + 2.0 ** -22) * x.abs() + 2.0 ** -10 / row_scales(x).unsqueeze(1)


def encode(rows: torch.Tensor) -> torch.Tensor:
    """[n, H] float rows → [n, words_per_row(H)] int32."""
    n, hidden = rows.shape
    padded = 4 * (words_per_row(hidden) - 1)
    x = rows.detach().to(torch.float32).contiguous()
    scales = row_scales(x)
    packed = torch.zeros(n, padded + 4, dtype=torch.uint8)
    if n and hidden:
        codes = torch.empty(n * hidden, dtype=torch.uint8)
        kernels.fp8_encode(x.view(-1), codes, scales, hidden, FORMAT)
        packed[:, :hidden] = codes.view(n, hidden)
    packed[:, padded:] = scales.view(torch.uint8).view(n, 4)
    return packed.view(torch.int32)


def decode(packed: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, words] int32 → [n, H] rows of ``dtype``."""
    n = packed.shape[0]
    padded = 4 * (words_per_row(hidden) - 1)
    raw = packed.contiguous().view(torch.uint8).view(n, padded + 4)
    scales = raw[:, padded:].contiguous().view(torch.float32).view(n)
    out = torch.empty(n * hidden, dtype=torch.float32)
    if n and hidden:
        kernels.fp8_decode(raw[:, :hidden].contiguous().view(-1), out, scales, hidden, FORMAT)
    return out.view(n, hidden).to(dtype)
