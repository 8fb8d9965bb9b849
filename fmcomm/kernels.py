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

_TORCH_OPS = {
    "sum": torch.add,
    "avg": torch.add,  # avg divides once at the end
    "prod": torch.mul,
    "min": torch.minimum,  # NaN-propagating, as the native kernel
    "max": torch.maximum,
}


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

    def __call__(self, dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        if dst.numel() == 0:
            return
        if self.native and dst.device.type == "cpu":
            _native.reduce(dst.data_ptr(), a.data_ptr(), b.data_ptr(), dst.numel(), self.dtype.code, REDOPS[self.op])
        else:
            _TORCH_OPS[self.op](a, b, out=dst)


def finish_avg(t: torch.Tensor, world: int) -> None:
    """The division that turns a sum into avg: true division on floats, truncation on ints."""
    if world == 1 or t.numel() == 0:
        return
    if t.is_floating_point():
        t.div_(world)
    else:
        t.div_(world, rounding_mode="trunc")
