"""Local compute the executor needs: element-wise reduction of two buffers.

Two paths with identical results: the native kernels of ``fmcomm._C`` (csrc/cpu/)
and torch's own CPU ops as the fallback. ``FMCOMM_NATIVE`` picks (see config).
"""
from __future__ import annotations

import torch

from .dtypes import REDOPS, DType
from .errors import ConfigError

try:
    from . import _C as _native  # type: ignore[attr-defined]
    NATIVE_IMPORT_ERROR: str | None = None
except ImportError as e:  # not built: the fallback serves
    _native = None
    NATIVE_IMPORT_ERROR = str(e)

def _pick(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, take_a: torch.Tensor) -> None:
    torch.where(take_a | torch.isnan(a), a, b, out=out)


def _minimum(a, b, out):
    # The native rule exactly: a if a < b or a is NaN, else b. torch.minimum is not
    # usable here: on a +0/-0 tie its vector body returns b and its scalar tail a.
    _pick(a, b, out, a < b)


def _maximum(a, b, out):
    _pick(a, b, out, a > b)


def _integer_minimum(a, b, out):
    torch.minimum(a, b, out=out)  # no NaN, no signed zero: exact


def _integer_maximum(a, b, out):
    torch.maximum(a, b, out=out)


_TORCH_OPS = {
    "sum": torch.add,
    "avg": torch.add,  # avg divides once at the end
    "prod": torch.mul,
    "min": _minimum,
    "max": _maximum,
}
_TORCH_INT_OPS = {**_TORCH_OPS, "min": _integer_minimum, "max": _integer_maximum}


def native_available() -> bool:
    return _native is not None


def resolve_native(setting: str) -> bool:
    """Whether to use the native kernels for config value ``native``."""
    if setting == "off":
        return False
    if setting == "on" and _native is None:
        raise ConfigError(f"FMCOMM_NATIVE=on but fmcomm._C is not built ({NATIVE_IMPORT_ERROR})")
    return _native is not None


class Reducer:
    """The reduction one collective uses: fixed dtype and op, native or torch."""

    def __init__(self, dtype: DType, op: str, use_native: bool):
        self.dtype, self.op = dtype, op
        self.native = use_native and _native is not None
        if self.native and dtype.name == "float16" and not _native.has_float16():
            self.native = False
        self._fallback = (_TORCH_OPS if dtype.is_float else _TORCH_INT_OPS)[op]
        self._code = REDOPS[op]

    def ranges(self, bufs: dict, dst, a, b) -> None:
        """dst = a op b for schedule ranges (``Range``) into the flat tensors ``bufs``."""
        if self.native and bufs[dst.buf].device.type == "cpu":
            isz = self.dtype.itemsize
            if dst.count:
                _native.reduce(bufs[dst.buf].data_ptr() + dst.offset * isz, bufs[a.buf].data_ptr() + a.offset * isz,
                               bufs[b.buf].data_ptr() + b.offset * isz, dst.count, self.dtype.code, self._code)
        else:
            self(bufs[dst.buf][dst.offset:dst.end], bufs[a.buf][a.offset:a.end], bufs[b.buf][b.offset:b.end])

    def __call__(self, dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        if dst.numel() == 0:
            return
        if self.native and dst.device.type == "cpu":
            _native.reduce(dst.data_ptr(), a.data_ptr(), b.data_ptr(), dst.numel(), self.dtype.code, REDOPS[self.op])
        else:
            self._fallback(a, b, out=dst)


def finish_avg(t: torch.Tensor, world: int) -> None:
    """The division that turns a sum into avg: true division on floats, truncation on ints."""
    if world == 1 or t.numel() == 0:
        return
    if t.is_floating_point():
        t.div_(world)
    else:
        t.div_(world, rounding_mode="trunc")
