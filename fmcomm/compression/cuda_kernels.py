"""CUDA compression kernels: csrc/cuda/compress.cu, built by setup.py into fmcomm/_cuda_kernels.so.

The same functions as :mod:`fmcomm.compression.kernels` (names and argument order; no
``impl``), for CUDA tensors, each enqueued on ``torch.cuda.current_stream()`` of the
tensors' device; the contract is written out in that module's docstring. The library is
loaded with ctypes the first time something here asks for it (never by ``import fmcomm``),
so a machine without a GPU, without a driver or without the built file imports fmcomm as
usual; :func:`available` says whether the kernels can run and :func:`why_unavailable` why
not. Built only where setup.py found ``nvcc`` (see setup.py's docstring: BUILD_FMCOMM_CUDA).

Every function checks its arguments (dtype, 1-D, contiguity, sizes, one CUDA device, no
output overlapping another argument, ``fmt``, ``block >= 1``, ``0 <= k <= n``) and raises
:class:`~fmcomm.errors.InvalidArgument` naming the argument before any kernel runs;
:class:`~fmcomm.errors.UnsupportedError` when the kernels cannot run here; and
:class:`~fmcomm.errors.FmcommError` with CUDA's message when a launch fails.

Bits. fp8_encode/fp8_decode, the sign bits and residual of onebit_encode given its scale,
onebit_decode, topk_select and scatter_add equal the torch fallback bit for bit on the same
device (every float step one IEEE round-to-nearest operation, nothing contracted into an
FMA, no flush to zero). NaN payloads are no part of the contract: where a NaN comes out,
another NaN may (the GPU's arithmetic returns its canonical NaN). The one exception to
bit-equality is **onebit_encode's scale**: the contract's sequential 8-lane float64 sum
cannot be run in parallel, so on CUDA the mean ``|c|`` is a fixed-order float64 tree
(each thread its elements in index order, then fixed per-block and final trees, a grid
that depends only on n), rounded to float32 the same way. It is deterministic, the same
bits on every run and every GPU for one build of this library, but may differ from the
CPU's scale in the last bit (both sums are float64, so at most one float32 ulp in practice). A rank always uses the scale that travels in the
payload, so ranks still agree; the sign bits and the residual for that scale are exact.

Synchronization. onebit_encode waits for the current stream, since it returns the scale
as a Python float; scatter_add waits for it too, to check the indices are in range before
anything is written (``_scatter_add_unchecked`` skips that check: the kernel itself ignores
indices out of range). Everything else only enqueues work.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

from . import arguments
from ..errors import FmcommError, InvalidArgument, UnsupportedError

__all__ = ["available", "why_unavailable", "library_path", "fp8_encode", "fp8_decode", "onebit_encode",
           "onebit_decode", "topk_select", "scatter_add"]

LIBRARY_NAME = "_cuda_kernels.so"
ABI_VERSION = 1
FP8_CODES = {"e4m3": 0, "e5m2": 1}
MAX_TOPK_ELEMENTS = 2**31 - 1  # indices are int32

_P = ctypes.c_uint64  # a device address or a stream handle
_N = ctypes.c_int64
_I = ctypes.c_int
# Every symbol the library exports, with its signature (restype, argtypes).
SIGNATURES = {
    "fmcomm_cuda_abi_version": (_I, []),
    "fmcomm_cuda_build_info": (ctypes.c_char_p, []),
    "fmcomm_cuda_error_string": (ctypes.c_char_p, [_I]),
    "fmcomm_cuda_probe": (_I, [_I]),
    "fmcomm_cuda_fp8_encode": (_I, [_P, _P, _P, _P, _N, _N, _I, _I, _P]),
    "fmcomm_cuda_fp8_decode": (_I, [_P, _P, _P, _N, _N, _I, _I, _I, _P]),
    "fmcomm_cuda_onebit_workspace_bytes": (_N, [_N]),
    "fmcomm_cuda_onebit_encode": (_I, [_P, _P, _P, _N, _P, _P, _N, _I, _P]),
    "fmcomm_cuda_onebit_encode_with_scale": (_I, [_P, _P, _P, _N, ctypes.c_float, _I, _P]),
    "fmcomm_cuda_onebit_decode": (_I, [_P, _P, _N, ctypes.c_float, _I, _I, _P]),
    "fmcomm_cuda_topk_workspace_bytes": (_N, [_N]),
    "fmcomm_cuda_topk_select": (_I, [_P, _P, _N, _N, _P, _P, _P, _N, _I, _P]),
    "fmcomm_cuda_scatter_add": (_I, [_P, _P, _P, _N, _N, _I, _P]),
    # host emulation of the kernels' arithmetic (no CUDA call), for tests without a GPU
    "fmcomm_cuda_host_fp8_encode": (None, [ctypes.c_void_p] * 4 + [_N, _N, _I]),
    "fmcomm_cuda_host_fp8_decode": (None, [ctypes.c_void_p] * 3 + [_N, _N, _I, _I]),
    "fmcomm_cuda_host_onebit_encode_with_scale": (None, [ctypes.c_void_p] * 3 + [_N, ctypes.c_float]),
    "fmcomm_cuda_host_topk_select": (_I, [ctypes.c_void_p, ctypes.c_void_p, _N, _N, ctypes.c_void_p,
                                          ctypes.c_void_p]),
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_device_error: dict[int, str] = {}  # device index -> "" (runs) or why not


def library_path() -> Path:
    """Where setup.py puts the library: beside the package's modules."""
    return Path(__file__).resolve().parent.parent / LIBRARY_NAME


def _load_library() -> ctypes.CDLL | None:
    """The library with its signatures set (loading it starts no CUDA); None if it cannot be loaded."""
    global _lib, _load_error
    with _lock:
        if _lib is not None or _load_error is not None:
            return _lib
        path = library_path()
        if not path.exists():
            _load_error = f"{path} is not built (setup.py builds it where nvcc is found)"
            return None
        try:
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
            for name, (restype, argtypes) in SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
        except (OSError, AttributeError) as e:
            _load_error = f"cannot load {path}: {e}"
            return None
        if lib.fmcomm_cuda_abi_version() != ABI_VERSION:
            _load_error = f"{path} has ABI {lib.fmcomm_cuda_abi_version()}, this module wants {ABI_VERSION} (rebuild it)"
            return None
        _lib = lib
        return lib


def build_info() -> str:
    """What the library was built for (CUDA runtime, architectures), or why it cannot be loaded."""
    lib = _load_library()
    return lib.fmcomm_cuda_build_info().decode() if lib is not None else str(_load_error)


def _device_problem(index: int) -> str:
    """"" when the kernels run on CUDA device ``index``, else why not (checked once per device)."""
    lib = _load_library()
    if lib is None:
        return str(_load_error)
    with _lock:
        if index not in _device_error:
            code = lib.fmcomm_cuda_probe(index)
            _device_error[index] = "" if code == 0 else (
                f"CUDA error {code} on device {index}: {lib.fmcomm_cuda_error_string(code).decode()}"
                f" ({lib.fmcomm_cuda_build_info().decode()})")
        return _device_error[index]


def _why(index: int | None) -> str:
    try:
        cuda = torch.cuda.is_available()
    except Exception as e:  # noqa: BLE001 - a broken CUDA setup is one more reason
        return f"torch.cuda.is_available() failed: {e}"
    if not cuda:
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a build without CUDA"
        return "torch.cuda.is_available() is False (no GPU or no driver)"
    if _load_library() is None:
        return str(_load_error)
    return _device_problem(torch.cuda.current_device() if index is None else index)


def why_unavailable() -> str:
    """Empty when the CUDA kernels can run on the current CUDA device; otherwise the reason."""
    return _why(None)


def available() -> bool:
    """Whether the CUDA kernels are built and run on the current CUDA device."""
    return _why(None) == ""


def _require(device: torch.device, kernel: str) -> ctypes.CDLL:
    why = _why(device.index)
    if why:
        raise UnsupportedError(f"{kernel}: the CUDA kernels are not available: {why}")
    return _lib  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Argument checks (devices last, so everything else can be checked without a GPU)


_vector = arguments.vector
_integer = arguments.integer
_flag = arguments.flag


def _fmt(fmt) -> int:
    if not isinstance(fmt, str) or fmt not in FP8_CODES:
        raise InvalidArgument(f"fmt must be one of {sorted(FP8_CODES)}, got {fmt!r}")
    return FP8_CODES[fmt]


_scale_value = arguments.scale_value


def _device(named: list) -> torch.device:
    """The one CUDA device of all the given (name, tensor) pairs (None entries skipped)."""
    device = None
    first = None
    for name, t in named:
        if t is None:
            continue
        if t.device.type != "cuda":
            raise InvalidArgument(f"{name} must be a CUDA tensor, got one on {t.device}")
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise InvalidArgument(f"{name} is on {t.device}, {first} is on {device}")
    assert device is not None
    return device


def _disjoint(outputs: list, inputs: list) -> None:
    """No output may share memory with another argument: the kernels read and write in one pass."""
    def present(pairs):
        return [(name, t) for name, t in pairs if t is not None and t.numel()]

    def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
        a0, b0 = a.data_ptr(), b.data_ptr()
        return (a.device == b.device and a0 < b0 + b.numel() * b.element_size()
                and b0 < a0 + a.numel() * a.element_size())

    outs, ins = present(outputs), present(inputs)
    for i, (name, out) in enumerate(outs):
        for other_name, other in outs[i + 1:] + ins:
            if overlap(out, other):
                raise InvalidArgument(f"{name} overlaps {other_name} in memory")


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _check(lib: ctypes.CDLL, code: int, kernel: str) -> None:
    if code != 0:
        raise FmcommError(f"{kernel}: CUDA error {code}: {lib.fmcomm_cuda_error_string(code).decode()}")


# ---------------------------------------------------------------------------------------
# fp8


def fp8_encode(x: torch.Tensor, out_u8: torch.Tensor, scale_f32: torch.Tensor, block: int, fmt: str,
               residual: torch.Tensor | None = None) -> None:
    """out_u8 = fp8 codes of (x [+ residual]) * scale_f32[i // block], saturating; residual updated."""
    code = _fmt(fmt)
    _vector("x", x, torch.float32)
    n = x.numel()
    block = _integer("block", block, 1)
    _vector("out_u8", out_u8, torch.uint8, n)
    _vector("scale_f32", scale_f32, torch.float32, -(-n // block))
    if residual is not None:
        _vector("residual", residual, torch.float32, n)
    device = _device([("x", x), ("out_u8", out_u8), ("scale_f32", scale_f32), ("residual", residual)])
    _disjoint([("out_u8", out_u8), ("residual", residual)], [("x", x), ("scale_f32", scale_f32)])
    lib = _require(device, "fp8_encode")
    if n:
        _check(lib, lib.fmcomm_cuda_fp8_encode(x.data_ptr(), _address(residual), out_u8.data_ptr(),
                                               scale_f32.data_ptr(), n, block, code, device.index, _stream(device)),
               "fp8_encode")


def fp8_decode(q_u8: torch.Tensor, out_f32: torch.Tensor, scale_f32: torch.Tensor, block: int, fmt: str,
               accumulate: bool = False) -> None:
    """out_f32 (+)= fp8 value of q_u8 / scale_f32[i // block] (a true float32 division)."""
    code = _fmt(fmt)
    _vector("q_u8", q_u8, torch.uint8)
    n = q_u8.numel()
    block = _integer("block", block, 1)
    _vector("out_f32", out_f32, torch.float32, n)
    _vector("scale_f32", scale_f32, torch.float32, -(-n // block))
    accumulate = _flag("accumulate", accumulate)
    device = _device([("q_u8", q_u8), ("out_f32", out_f32), ("scale_f32", scale_f32)])
    _disjoint([("out_f32", out_f32)], [("q_u8", q_u8), ("scale_f32", scale_f32)])
    lib = _require(device, "fp8_decode")
    if n:
        _check(lib, lib.fmcomm_cuda_fp8_decode(q_u8.data_ptr(), out_f32.data_ptr(), scale_f32.data_ptr(), n, block,
                                               code, int(accumulate), device.index, _stream(device)),
               "fp8_decode")


# ---------------------------------------------------------------------------------------
# 1-bit


def _onebit_args(x, out_u8, residual):
    _vector("x", x, torch.float32)
    n = x.numel()
    _vector("out_u8", out_u8, torch.uint8, -(-n // 8))
    if residual is not None:
        _vector("residual", residual, torch.float32, n)
    device = _device([("x", x), ("out_u8", out_u8), ("residual", residual)])
    _disjoint([("out_u8", out_u8), ("residual", residual)], [("x", x)])
    return n, device


def onebit_encode(x: torch.Tensor, out_u8: torch.Tensor, residual: torch.Tensor | None = None) -> float:
    """Sign bits of x [+ residual] (1 = negative); returns mean |c| as a float32 value (see the module doc)."""
    n, device = _onebit_args(x, out_u8, residual)
    lib = _require(device, "onebit_encode")
    if n == 0:
        return 0.0
    workspace = torch.empty(lib.fmcomm_cuda_onebit_workspace_bytes(n), dtype=torch.uint8, device=device)
    scale = torch.empty(1, dtype=torch.float32, device=device)
    _check(lib, lib.fmcomm_cuda_onebit_encode(x.data_ptr(), _address(residual), out_u8.data_ptr(), n,
                                              scale.data_ptr(), workspace.data_ptr(), workspace.numel(),
                                              device.index, _stream(device)),
           "onebit_encode")
    return float(scale.item())  # waits for the stream: the value is read after the kernels ran


def _onebit_encode_with_scale(x: torch.Tensor, out_u8: torch.Tensor, scale: float,
                              residual: torch.Tensor | None = None) -> None:
    """onebit_encode's sign bits and residual update for a given scale (no reduction); for tests."""
    n, device = _onebit_args(x, out_u8, residual)
    scale = _scale_value(scale)
    lib = _require(device, "onebit_encode")
    if n:
        _check(lib, lib.fmcomm_cuda_onebit_encode_with_scale(x.data_ptr(), _address(residual), out_u8.data_ptr(), n,
                                                             scale, device.index, _stream(device)),
               "onebit_encode")


def onebit_decode(bits_u8: torch.Tensor, out_f32: torch.Tensor, scale: float, accumulate: bool = False) -> None:
    """out_f32 (+)= -scale where the bit is set, +scale elsewhere (scale rounded to float32)."""
    _vector("out_f32", out_f32, torch.float32)
    n = out_f32.numel()
    _vector("bits_u8", bits_u8, torch.uint8, -(-n // 8))
    scale = _scale_value(scale)
    accumulate = _flag("accumulate", accumulate)
    device = _device([("out_f32", out_f32), ("bits_u8", bits_u8)])
    _disjoint([("out_f32", out_f32)], [("bits_u8", bits_u8)])
    lib = _require(device, "onebit_decode")
    if n:
        _check(lib, lib.fmcomm_cuda_onebit_decode(bits_u8.data_ptr(), out_f32.data_ptr(), n, scale, int(accumulate),
                                                  device.index, _stream(device)),
               "onebit_decode")


# ---------------------------------------------------------------------------------------
# top-k


def topk_select(x: torch.Tensor, k: int, idx_out_i32: torch.Tensor, val_out_f32: torch.Tensor,
                residual: torch.Tensor | None = None) -> None:
    """The k largest |x [+ residual]| (ties: lower index first; NaN above all) in increasing index order."""
    _vector("x", x, torch.float32)
    n = x.numel()
    if n > MAX_TOPK_ELEMENTS:
        raise InvalidArgument(f"x has {n} elements; topk_select takes at most {MAX_TOPK_ELEMENTS} (int32 indices)")
    k = _integer("k", k, 0, n)
    _vector("idx_out_i32", idx_out_i32, torch.int32, k)
    _vector("val_out_f32", val_out_f32, torch.float32, k)
    if residual is not None:
        _vector("residual", residual, torch.float32, n)
    device = _device([("x", x), ("idx_out_i32", idx_out_i32), ("val_out_f32", val_out_f32), ("residual", residual)])
    _disjoint([("idx_out_i32", idx_out_i32), ("val_out_f32", val_out_f32), ("residual", residual)], [("x", x)])
    lib = _require(device, "topk_select")
    if n == 0:
        return
    workspace = torch.empty(lib.fmcomm_cuda_topk_workspace_bytes(n), dtype=torch.uint8, device=device)
    _check(lib, lib.fmcomm_cuda_topk_select(x.data_ptr(), _address(residual), n, k, idx_out_i32.data_ptr(),
                                            val_out_f32.data_ptr(), workspace.data_ptr(), workspace.numel(),
                                            device.index, _stream(device)),
           "topk_select")


# ---------------------------------------------------------------------------------------
# scatter-add


def _scatter_args(idx_i32, val_f32, out_f32):
    _vector("idx_i32", idx_i32, torch.int32)
    count = idx_i32.numel()
    _vector("val_f32", val_f32, torch.float32, count)
    _vector("out_f32", out_f32, torch.float32)
    device = _device([("idx_i32", idx_i32), ("val_f32", val_f32), ("out_f32", out_f32)])
    _disjoint([("out_f32", out_f32)], [("idx_i32", idx_i32), ("val_f32", val_f32)])
    return count, device


def scatter_add(idx_i32: torch.Tensor, val_f32: torch.Tensor, out_f32: torch.Tensor) -> None:
    """out_f32[idx_i32[j]] += val_f32[j] (indices distinct; checked in range, which waits for the stream)."""
    count, device = _scatter_args(idx_i32, val_f32, out_f32)
    if count:
        low, high = (int(v) for v in torch.aminmax(idx_i32))
        if low < 0 or high >= out_f32.numel():
            bad = low if low < 0 else high
            raise InvalidArgument(f"idx_i32 holds {bad}, outside [0, {out_f32.numel()}) of out_f32")
    _launch_scatter_add(idx_i32, val_f32, out_f32, count, device)


def _scatter_add_unchecked(idx_i32: torch.Tensor, val_f32: torch.Tensor, out_f32: torch.Tensor) -> None:
    """scatter_add without the range check of the indices (no wait): for callers that checked them."""
    count, device = _scatter_args(idx_i32, val_f32, out_f32)
    _launch_scatter_add(idx_i32, val_f32, out_f32, count, device)


def _launch_scatter_add(idx_i32, val_f32, out_f32, count: int, device: torch.device) -> None:
    lib = _require(device, "scatter_add")
    if count:
        _check(lib, lib.fmcomm_cuda_scatter_add(idx_i32.data_ptr(), val_f32.data_ptr(), out_f32.data_ptr(), count,
                                                out_f32.numel(), device.index, _stream(device)),
               "scatter_add")
