"""Gradient compressors and their error-feedback state.

A compressor turns float32 values into a fixed-size byte payload and back; it knows
nothing about ranks (the compressed collective in ``fmcomm/compressed.py`` does the
exchange). Every family is named by a spec string::

    none | fp16 | bf16 | fp8[:e4m3|:e5m2][,block=N] | onebit[:block=N] | topk:RATIO      each optionally @inter

``@inter`` compresses only between nodes (full precision inside a node); without it
every link carries compressed data. :func:`parse` checks a spec and says what is
wrong with a bad one.
"""
from __future__ import annotations

import dataclasses

from ..errors import InvalidArgument
from .base import Codec, Compressor
from .casts import CastCompressor
from .fp8 import FP8Compressor
from .onebit import BlockOneBitCompressor, OneBitCompressor
from .state import ErrorFeedback
from .topk import TopKCompressor

FAMILIES = ("none", "fp16", "bf16", "fp8", "onebit", "topk")
LEVELS = ("all", "inter")


@dataclasses.dataclass(frozen=True)
class CompressionSpec:
    """A parsed spec: the family, its options, and which links it applies to."""

    text: str                     # canonical form, e.g. "fp8:e4m3@inter"
    family: str
    level: str                    # "all" (every link) or "inter" (between nodes only)
    compressor: Compressor | None  # None for "none"

    @property
    def enabled(self) -> bool:
        return self.compressor is not None


def _fp8(args: list[str], spec: str) -> Compressor:
    fmt, block = "e4m3", 0
    for a in args:
        if a in ("e4m3", "e5m2"):
            fmt = a
        elif a.startswith("block="):
            try:
                block = int(a[len("block="):])
            except ValueError:
                block = -1
            if block < 1:
                raise InvalidArgument(f"compress={spec!r}: block must be a positive integer, got {a!r}")
        else:
            raise InvalidArgument(f"compress={spec!r}: unknown fp8 option {a!r}; use e4m3, e5m2 or block=N")
    return FP8Compressor(fmt, block)


def _topk(args: list[str], spec: str) -> Compressor:
    if len(args) != 1:
        raise InvalidArgument(f"compress={spec!r}: top-k needs one ratio, e.g. topk:0.01")
    try:
        ratio = float(args[0])
    except ValueError:
        raise InvalidArgument(f"compress={spec!r}: top-k ratio {args[0]!r} is not a number") from None
    if not 0.0 < ratio <= 1.0:
        raise InvalidArgument(f"compress={spec!r}: top-k ratio must be in (0, 1], got {ratio}")
    return TopKCompressor(ratio)


def _onebit(args: list[str], spec: str) -> Compressor:
    if not args:
        return OneBitCompressor()
    if len(args) == 1 and args[0].startswith("block="):
        try:
            block = int(args[0][len("block="):])
        except ValueError:
            block = -1
        if block >= 8 and block % 8 == 0:
            return BlockOneBitCompressor(block)
        raise InvalidArgument(f"compress={spec!r}: onebit's block must be a positive multiple of 8, got {args[0]!r}")
    raise InvalidArgument(f"compress={spec!r}: unknown onebit option {args[0]!r}; use block=N")


def _no_args(family: str, make):
    def build(args: list[str], spec: str) -> Compressor:
        if args:
            raise InvalidArgument(f"compress={spec!r}: {family} takes no options")
        return make()
    return build


_BUILDERS = {
    "fp16": _no_args("fp16", lambda: CastCompressor("fp16")),
    "bf16": _no_args("bf16", lambda: CastCompressor("bf16")),
    "fp8": _fp8,
    "onebit": _onebit,
    "topk": _topk,
}


def parse(spec: "str | CompressionSpec | None") -> CompressionSpec:
    """Parse ``spec`` (see the module docstring); ``None`` means ``none``."""
    if isinstance(spec, CompressionSpec):
        return spec
    if spec is None:
        spec = "none"
    if not isinstance(spec, str):
        raise InvalidArgument(f"compress must be a string such as 'fp8@inter', got {type(spec).__name__}")
    text = spec.strip().lower()
    body, level = text, "all"
    if "@" in text:
        body, _, where = text.partition("@")
        if where != "inter":
            raise InvalidArgument(f"compress={spec!r}: unknown level {where!r}; the only level is @inter "
                                  f"(between nodes)")
        level = "inter"
    family, _, rest = body.partition(":")
    args = [a for a in (x.strip() for x in rest.split(",")) if a] if rest else []
    if family == "none":
        if args or level != "all":
            raise InvalidArgument(f"compress={spec!r}: 'none' takes no options or level")
        return CompressionSpec("none", "none", "all", None)
    if family not in _BUILDERS:
        raise InvalidArgument(f"compress={spec!r}: unknown compressor {family!r}; choose from "
                              f"{', '.join(FAMILIES)} (e.g. fp8, onebit, topk:0.01, each optionally @inter)")
    compressor = _BUILDERS[family](args, spec)
    return CompressionSpec(compressor.name + ("@inter" if level == "inter" else ""), family, level, compressor)


__all__ = ["parse", "CompressionSpec", "Compressor", "Codec", "ErrorFeedback", "FAMILIES",
           "BlockOneBitCompressor", "CastCompressor", "FP8Compressor", "OneBitCompressor", "TopKCompressor"]
