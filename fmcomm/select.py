"""Choosing an algorithm for ``algo="auto"``.

For now one documented rule (the tuner of a later issue replaces it with measured
tables): use the engine's native all-reduce wherever it supports the dtype and op,
because on one box it is what every fmcomm schedule is measured against and it has
no Python overhead per message; use ``ring`` where the engine cannot (MPI has no
bfloat16 sum, for example), and also from ``auto_ring_min_bytes`` up when that
option is set (its default, 0, means never). Thresholds live in the configuration,
not here.
"""
from __future__ import annotations

from .algorithms import AUTO, NATIVE, REGISTRY, names
from .config import Config
from .dtypes import DType
from .errors import InvalidArgument, UnsupportedError
from .transport.base import Transport


def select(collective: str, nbytes: int, dtype: DType, op: str, device: str,
           transport: Transport, config: Config, algo: str | None = None) -> str:
    """The algorithm to run: ``algo`` if given, else the configured one, resolving ``auto``."""
    algo = (algo or config.algo).lower()
    if algo not in names(collective):
        raise InvalidArgument(f"unknown algorithm {algo!r} for {collective}; choose from {', '.join(names(collective))}")
    native_ok = transport.supports_native(collective, dtype, op, device)
    if algo == NATIVE and not native_ok:
        raise UnsupportedError(f"the {transport.name} transport has no native {collective} for "
                               f"{dtype.name} {op} on {device}; use algo='ring' or 'auto'")
    if algo != AUTO:
        return algo
    if native_ok and not (config.auto_ring_min_bytes and nbytes >= config.auto_ring_min_bytes):
        return NATIVE
    if (collective, "ring") in REGISTRY:
        return "ring"
    raise UnsupportedError(f"no algorithm can run {collective} of {dtype.name} {op} on {transport.name}")
