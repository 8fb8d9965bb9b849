"""Compression kernels: fp8, 1-bit sign and top-k, each with a fused error-feedback form.

Three implementations give the same bits: the CPU native kernels of ``fmcomm._C``
(csrc/cpu/compress.cpp), the CUDA kernels of ``fmcomm.compression.cuda_kernels``, and
the torch fallback here, which runs on any device. Every function takes
``impl=None | "native" | "torch"``: ``None`` picks the native kernels for the tensors'
device when they are built (``fmcomm._C`` on CPU, cuda_kernels on CUDA) and the torch
fallback otherwise; ``"native"`` raises :class:`~fmcomm.errors.UnsupportedError` when they
are not. Arguments are checked here, for every implementation, and a bad one raises
:class:`~fmcomm.errors.InvalidArgument` naming it before any kernel runs: tensors are 1-D,
contiguous, on one device, of the stated dtype and size, and no output (``residual``
included) overlaps another argument in memory. Functions return None unless stated.

The contract, step by step (each step one IEEE float32 operation unless stated):

Error feedback. Where ``residual`` is given, a kernel first forms ``c = x + residual``,
compresses ``c``, and stores ``c - decode(compressed)`` back into ``residual``.
Without it, ``c = x``.

``fp8_encode(x, out_u8, scale_f32, block, fmt, residual=None)``
    ``fmt`` "e4m3" (``torch.float8_e4m3fn``, max finite 448, no infinity) or "e5m2"
    (``torch.float8_e5m2``, max finite 57344). Element i uses ``s = scale_f32[i // block]``;
    ``scale_f32`` has ``ceil(n / block)`` entries (block >= 1; one scale for all: block >= n).
    ``v = c * s``, rounded to nearest even in the format; ``|v|`` past the max finite value
    (infinity included) saturates to +-max; NaN stays NaN (code 0x7f, sign kept). The
    bits are those of ``torch.clamp(v, -max, max).to(fp8 dtype)``. Scales must be > 0 and
    finite (not checked). With residual: ``residual = c - decode(out)`` as below.
``fp8_decode(q_u8, out_f32, scale_f32, block, fmt, accumulate=False)``
    ``d = float32(fp8 value of q) / scale`` (a true division, not a multiply by the
    reciprocal); ``out = d``, or ``out += d`` when accumulating.
``onebit_encode(x, out_u8, residual=None) -> float``
    ``out_u8`` has ``ceil(n / 8)`` bytes; bit ``i % 8`` (least significant first) of byte
    ``i // 8`` is 1 iff ``c[i] < 0`` (so both zeros and NaN give 0); unused high bits are 0.
    Returns the scale, the mean of ``|c|`` as a float32 value: ``|c|`` is summed in float64
    in 8 interleaved lanes (lane j: the elements with ``i % 8 == j``, in increasing i), the
    lanes are added in order (lane0 + lane1, then + lane2, ... + lane7), the total is divided
    by n in float64 and rounded to float32; n = 0 gives 0.0. That order is what lets every
    implementation agree. With residual: ``residual = c - (-scale if c < 0 else scale)``.
``onebit_decode(bits_u8, out_f32, scale, accumulate=False)``
    ``d = -scale if the bit is set else scale`` (scale rounded to float32); ``out = d`` or
    ``out += d``.
``topk_select(x, k, idx_out_i32, val_out_f32, residual=None)``
    ``0 <= k <= n``. The selection is the k elements of largest ``|c|``, ties going to the
    lower index (the first k of a stable descending sort of ``|c|``; NaN ranks above
    everything, as in torch's sort). ``idx_out`` receives them in increasing index order,
    ``val_out[j] = c[idx_out[j]]``. With residual: ``residual = c`` with the selected
    elements set to +0.0. Inputs are expected finite; NaN does not break the kernels.
``scatter_add(idx_i32, val_f32, out_f32)``
    ``out[idx[j]] += val[j]`` in order of j. Indices are checked to be in range; they must
    also be distinct within one call (not checked: it would need a sort).

NaN. A NaN input gives NaN results (and the NaN code, sign kept, from fp8_encode). Where
one operation meets two NaNs (``x + residual`` with both NaN, a NaN minus the NaN it
decodes to, accumulating into a NaN), which payload and sign survive is not specified:
IEEE 754 leaves it open, and on x86 it follows operand order, which neither torch nor the
compiler fixes. Everything else is specified to the bit.

The torch fallback is the expressions named above; the native kernels match it bit for bit
(tests/unit/test_compression_kernels.py), on every build of their hot loops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import arguments
from ..errors import InvalidArgument, UnsupportedError

try:
    from .. import _C as _native_module  # type: ignore[attr-defined]
    if hasattr(_native_module, "fp8_encode"):
        _native = _native_module
        NATIVE_IMPORT_ERROR: str | None = None
    else:  # an extension built before these kernels existed
        _native = None
        NATIVE_IMPORT_ERROR = "fmcomm._C has no compression kernels (rebuild it)"
except ImportError as e:  # not built: the fallback serves
    _native = None
    NATIVE_IMPORT_ERROR = str(e)

__all__ = ["fp8_encode", "fp8_decode", "onebit_encode", "onebit_decode", "topk_select", "scatter_add",
           "native_available", "FP8_FORMATS", "Fp8Format"]

IMPLS = (None, "native", "torch")
MAX_TOPK_ELEMENTS = 2**31 - 1  # indices are int32


@dataclass(frozen=True)
class Fp8Format:
    name: str
    dtype: torch.dtype
    max: float  # largest finite value; encoding saturates to it
    code: int  # the format's number in fmcomm._C


FP8_FORMATS = {
    "e4m3": Fp8Format("e4m3", torch.float8_e4m3fn, 448.0, 0),
    "e5m2": Fp8Format("e5m2", torch.float8_e5m2, 57344.0, 1),
}


def native_available() -> bool:
    """Whether the CPU native compression kernels are built."""
    return _native is not None


# ---------------------------------------------------------------------------------------
# Argument checks


def _vector(name: str, t, dtype: torch.dtype, device: torch.device | None = None, numel: int | None = None):
    return arguments.vector(name, t, dtype, numel, device)
_integer = arguments.integer
_flag = arguments.flag


def _fp8_format(fmt) -> Fp8Format:
    if fmt not in FP8_FORMATS:
        raise InvalidArgument(f"fmt must be one of {sorted(FP8_FORMATS)}, got {fmt!r}")
    return FP8_FORMATS[fmt]


def _disjoint(outputs: list, inputs: list) -> None:
    """No output may share memory with any other argument: the kernels read and write in one pass."""
    def present(pairs):
        return [(name, t) for name, t in pairs if t is not None and t.numel()]

    def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
        a0, b0 = a.data_ptr(), b.data_ptr()
        a1, b1 = a0 + a.numel() * a.element_size(), b0 + b.numel() * b.element_size()
        return a.device == b.device and a0 < b1 and b0 < a1

    outs, ins = present(outputs), present(inputs)
    for i, (name, out) in enumerate(outs):
        for other_name, other in outs[i + 1:] + ins:
            if overlap(out, other):
                raise InvalidArgument(f"{name} overlaps {other_name} in memory")


_scale_value = arguments.scale_value


_to_float32 = arguments.float32_value


def _backend(impl, device: torch.device, kernel: str):
    """"cpu" (fmcomm._C), "torch", or the cuda_kernels module, for tensors on ``device``."""
    if impl not in IMPLS:
        raise InvalidArgument(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if device.type == "cpu":
        if _native is not None:
            return "cpu"
        why = f"fmcomm._C is not built ({NATIVE_IMPORT_ERROR})"
    elif device.type == "cuda":
        cuda = _cuda_kernels()
        if cuda is not None:
            return cuda
        why = "fmcomm.compression.cuda_kernels are not available"
    else:
        why = f"no native {kernel} kernel for {device.type} tensors"
    if impl == "native":
        raise UnsupportedError(f"{kernel}(impl='native'): {why}")
    return "torch"


def _cuda_kernels():
    """The CUDA kernels module when it imports and says its kernels work (``available()``), else None."""
    try:
        from . import cuda_kernels  # imported only when CUDA tensors arrive
    except ImportError:
        return None
    available = getattr(cuda_kernels, "available", None)
    if callable(available):
        available = available()
    return cuda_kernels if (available is None or available) else None


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# ---------------------------------------------------------------------------------------
# fp8


def fp8_encode(x: torch.Tensor, out_u8: torch.Tensor, scale_f32: torch.Tensor, block: int, fmt: str,
               residual: torch.Tensor | None = None, impl: str | None = None) -> None:
    """out_u8 = fp8 codes of (x [+ residual]) * scale_f32[i // block], saturating (see the module doc)."""
    form = _fp8_format(fmt)
    _vector("x", x, torch.float32)
    n, device = x.numel(), x.device
    block = _integer("block", block, 1)
    _vector("out_u8", out_u8, torch.uint8, device, n)
    _vector("scale_f32", scale_f32, torch.float32, device, -(-n // block))
    if residual is not None:
        _vector("residual", residual, torch.float32, device, n)
    _disjoint([("out_u8", out_u8), ("residual", residual)], [("x", x), ("scale_f32", scale_f32)])
    backend = _backend(impl, device, "fp8_encode")
    if backend == "cpu":
        if n:
            _native.fp8_encode(x.data_ptr(), _address(residual), out_u8.data_ptr(), scale_f32.data_ptr(), n, block,
                               form.code)
    elif backend == "torch":
        _torch_fp8_encode(x, out_u8, scale_f32, block, form, residual)
    else:
        backend.fp8_encode(x, out_u8, scale_f32, block, fmt, residual=residual)


def fp8_decode(q_u8: torch.Tensor, out_f32: torch.Tensor, scale_f32: torch.Tensor, block: int, fmt: str,
               accumulate: bool = False, impl: str | None = None) -> None:
    """out_f32 (+)= fp8 value of q_u8 / scale_f32[i // block] (see the module doc)."""
    form = _fp8_format(fmt)
    _vector("q_u8", q_u8, torch.uint8)
    n, device = q_u8.numel(), q_u8.device
    block = _integer("block", block, 1)
    _vector("out_f32", out_f32, torch.float32, device, n)
    _vector("scale_f32", scale_f32, torch.float32, device, -(-n // block))
    accumulate = _flag("accumulate", accumulate)
    _disjoint([("out_f32", out_f32)], [("q_u8", q_u8), ("scale_f32", scale_f32)])
    backend = _backend(impl, device, "fp8_decode")
    if backend == "cpu":
        if n:
            _native.fp8_decode(q_u8.data_ptr(), out_f32.data_ptr(), scale_f32.data_ptr(), n, block, form.code,
                               accumulate)
    elif backend == "torch":
        _torch_fp8_decode(q_u8, out_f32, scale_f32, block, form, accumulate)
    else:
        backend.fp8_decode(q_u8, out_f32, scale_f32, block, fmt, accumulate=accumulate)


def _per_block(t: torch.Tensor, scale: torch.Tensor, block: int, op) -> torch.Tensor:
    """op(t[i], scale[i // block]) for every i: one float32 operation per element."""
    n = t.numel()
    result = torch.empty_like(t)
    whole = n // block * block
    if whole:
        rows = whole // block
        op(t[:whole].view(rows, block), scale[:rows].unsqueeze(1), out=result[:whole].view(rows, block))
    if whole < n:
        op(t[whole:], scale[-1:], out=result[whole:])
    return result


def _torch_fp8_encode(x, out_u8, scale_f32, block, form: Fp8Format, residual):
    c = x if residual is None else x + residual
    scaled = _per_block(c, scale_f32, block, torch.mul)
    q = torch.clamp(scaled, -form.max, form.max).to(form.dtype)
    out_u8.copy_(q.view(torch.uint8))
    if residual is not None:
        torch.sub(c, _per_block(q.to(torch.float32), scale_f32, block, torch.div), out=residual)


def _torch_fp8_decode(q_u8, out_f32, scale_f32, block, form: Fp8Format, accumulate):
    d = _per_block(q_u8.view(form.dtype).to(torch.float32), scale_f32, block, torch.div)
    if accumulate:
        out_f32.add_(d)
    else:
        out_f32.copy_(d)


# ---------------------------------------------------------------------------------------
# 1-bit


def onebit_encode(x: torch.Tensor, out_u8: torch.Tensor, residual: torch.Tensor | None = None,
                  impl: str | None = None) -> float:
    """Sign bits of x [+ residual] into out_u8 (1 = negative); returns the mean |c| as a float32 value."""
    _vector("x", x, torch.float32)
    n, device = x.numel(), x.device
    _vector("out_u8", out_u8, torch.uint8, device, -(-n // 8))
    if residual is not None:
        _vector("residual", residual, torch.float32, device, n)
    _disjoint([("out_u8", out_u8), ("residual", residual)], [("x", x)])
    backend = _backend(impl, device, "onebit_encode")
    if backend == "cpu":
        return _native.onebit_encode(x.data_ptr(), _address(residual), out_u8.data_ptr(), n) if n else 0.0
    if backend == "torch":
        return _torch_onebit_encode(x, out_u8, residual)
    return backend.onebit_encode(x, out_u8, residual=residual)


def onebit_decode(bits_u8: torch.Tensor, out_f32: torch.Tensor, scale: float, accumulate: bool = False,
                  impl: str | None = None) -> None:
    """out_f32 (+)= -scale where the bit is set, +scale elsewhere (scale rounded to float32)."""
    _vector("out_f32", out_f32, torch.float32)
    n, device = out_f32.numel(), out_f32.device
    _vector("bits_u8", bits_u8, torch.uint8, device, -(-n // 8))
    scale = _scale_value(scale)
    accumulate = _flag("accumulate", accumulate)
    _disjoint([("out_f32", out_f32)], [("bits_u8", bits_u8)])
    backend = _backend(impl, device, "onebit_decode")
    if backend == "cpu":
        if n:
            _native.onebit_decode(bits_u8.data_ptr(), out_f32.data_ptr(), scale, n, accumulate)
    elif backend == "torch":
        _torch_onebit_decode(bits_u8, out_f32, scale, accumulate)
    else:
        backend.onebit_decode(bits_u8, out_f32, scale, accumulate=accumulate)


_BIT_WEIGHTS = [1 << j for j in range(8)]


def _torch_onebit_encode(x, out_u8, residual) -> float:
    n = x.numel()
    if n == 0:
        return 0.0
    c = x if residual is None else x + residual
    negative = c < 0
    padded = n + (-n) % 8  # zero padding: no sign bit, and +0.0 in its lane's sum
    signs = torch.zeros(padded, dtype=torch.uint8, device=c.device)
    signs[:n] = negative
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=c.device)
    out_u8.copy_((signs.view(-1, 8) * weights).sum(1))
    magnitudes = torch.zeros(padded, dtype=torch.float64)
    # On the CPU: cumsum there adds sequentially, which is the contract's lane order.
    magnitudes[:n] = c.abs().cpu()
    lanes = magnitudes.view(-1, 8).cumsum(0)[-1].tolist()
    total = lanes[0]
    for lane in lanes[1:]:
        total += lane
    scale = _to_float32(total / n)
    if residual is not None:
        s = torch.tensor(scale, dtype=torch.float32, device=c.device)
        torch.sub(c, torch.where(negative, -s, s), out=residual)
    return scale


def _torch_onebit_decode(bits_u8, out_f32, scale: float, accumulate: bool):
    n = out_f32.numel()
    shifts = torch.arange(8, dtype=torch.uint8, device=bits_u8.device)
    bit_set = ((bits_u8.unsqueeze(1) >> shifts) & 1).view(-1)[:n].bool()
    s = torch.tensor(scale, dtype=torch.float32, device=out_f32.device)
    d = torch.where(bit_set, -s, s)
    if accumulate:
        out_f32.add_(d)
    else:
        out_f32.copy_(d)


# ---------------------------------------------------------------------------------------
# top-k


def topk_select(x: torch.Tensor, k: int, idx_out_i32: torch.Tensor, val_out_f32: torch.Tensor,
                residual: torch.Tensor | None = None, impl: str | None = None) -> None:
    """The k largest |x [+ residual]| (ties: lower index first), in increasing index order."""
    _vector("x", x, torch.float32)
    n, device = x.numel(), x.device
    if n > MAX_TOPK_ELEMENTS:
        raise InvalidArgument(f"x has {n} elements; topk_select takes at most {MAX_TOPK_ELEMENTS} (int32 indices)")
    k = _integer("k", k, 0, n)
    _vector("idx_out_i32", idx_out_i32, torch.int32, device, k)
    _vector("val_out_f32", val_out_f32, torch.float32, device, k)
    if residual is not None:
        _vector("residual", residual, torch.float32, device, n)
    _disjoint([("idx_out_i32", idx_out_i32), ("val_out_f32", val_out_f32), ("residual", residual)], [("x", x)])
    backend = _backend(impl, device, "topk_select")
    if backend == "cpu":
        if n:
            _native.topk_select(x.data_ptr(), _address(residual), n, k, idx_out_i32.data_ptr(),
                                val_out_f32.data_ptr())
    elif backend == "torch":
        _torch_topk_select(x, k, idx_out_i32, val_out_f32, residual)
    else:
        backend.topk_select(x, k, idx_out_i32, val_out_f32, residual=residual)


def _torch_topk_select(x, k, idx_out_i32, val_out_f32, residual):
    c = x if residual is None else x + residual
    chosen = torch.sort(c.abs(), descending=True, stable=True).indices[:k]
    idx = torch.sort(chosen).values
    idx_out_i32.copy_(idx)
    torch.index_select(c, 0, idx, out=val_out_f32)
    if residual is not None:
        residual.copy_(c)
        residual[idx] = 0.0


def scatter_add(idx_i32: torch.Tensor, val_f32: torch.Tensor, out_f32: torch.Tensor, impl: str | None = None) -> None:
    """out_f32[idx_i32[j]] += val_f32[j] in order of j (indices distinct, checked in range)."""
    _vector("idx_i32", idx_i32, torch.int32)
    count, device = idx_i32.numel(), idx_i32.device
    _vector("val_f32", val_f32, torch.float32, device, count)
    _vector("out_f32", out_f32, torch.float32, device)
    _disjoint([("out_f32", out_f32)], [("idx_i32", idx_i32), ("val_f32", val_f32)])
    if count:
        low, high = (int(v) for v in torch.aminmax(idx_i32))
        if low < 0 or high >= out_f32.numel():
            bad = low if low < 0 else high
            raise InvalidArgument(f"idx_i32 holds {bad}, outside [0, {out_f32.numel()}) of out_f32")
    backend = _backend(impl, device, "scatter_add")
    if backend == "cpu":
        if count:
            _native.scatter_add(idx_i32.data_ptr(), val_f32.data_ptr(), count, out_f32.data_ptr())
    elif backend == "torch":
        out_f32.index_add_(0, idx_i32.long(), val_f32)
    else:
        backend.scatter_add(idx_i32, val_f32, out_f32)
