"""Element types and reduction operations fmcomm reduces natively.

A dtype here is the element type of a collective's buffer; its ``code`` travels in
headers and to the native kernels, so codes are part of the wire format and never
change meaning.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class DType:
    name: str
    code: int
    torch: torch.dtype
    numpy: np.dtype | None  # numpy has no bfloat16
    itemsize: int
    is_float: bool
    # Unit roundoff u = 2^-(mantissa bits + 1): one correctly rounded operation
    # is off by at most u relative. Tests derive their tolerances from it.
    unit_roundoff: float


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float32", 0, torch.float32, np.dtype(np.float32), 4, True, 2.0 ** -24),
    DType("float64", 1, torch.float64, np.dtype(np.float64), 8, True, 2.0 ** -53),
    DType("float16", 2, torch.float16, np.dtype(np.float16), 2, True, 2.0 ** -11),
    DType("bfloat16", 3, torch.bfloat16, None, 2, True, 2.0 ** -8),
    DType("int32", 4, torch.int32, np.dtype(np.int32), 4, False, 0.0),
    DType("int64", 5, torch.int64, np.dtype(np.int64), 8, False, 0.0),
)}
_BY_TORCH = {d.torch: d for d in DTYPES.values()}
_BY_NUMPY = {d.numpy: d for d in DTYPES.values() if d.numpy is not None}
BY_CODE = {d.code: d for d in DTYPES.values()}

# Reduction codes, also part of the wire format. avg is sum followed by a division
# by the world size at the end, as torch.distributed does; on integers the division
# truncates toward zero (C semantics, as NCCL's ncclAvg).
REDOPS: dict[str, int] = {"sum": 0, "avg": 1, "min": 2, "max": 3, "prod": 4}


def dtype_of(obj) -> DType:
    """The fmcomm dtype of a torch dtype, numpy dtype or dtype name."""
    if isinstance(obj, DType):
        return obj
    if isinstance(obj, str):
        d = DTYPES.get(obj)
        if d is None:
            raise InvalidArgument(f"unsupported dtype {obj!r}; fmcomm reduces {', '.join(DTYPES)}")
        return d
    if isinstance(obj, torch.dtype):
        d = _BY_TORCH.get(obj)
    else:
        d = _BY_NUMPY.get(np.dtype(obj))
    if d is None:
        raise InvalidArgument(f"unsupported dtype {obj}; fmcomm reduces {', '.join(DTYPES)}")
    return d


def redop_code(op: str) -> int:
    if not isinstance(op, str) or op.lower() not in REDOPS:
        raise InvalidArgument(f"unsupported reduction op {op!r}; use one of {', '.join(REDOPS)}")
    return REDOPS[op.lower()]
