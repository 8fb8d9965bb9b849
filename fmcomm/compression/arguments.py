"""Argument checks shared by the compression kernels' entry points (CPU and CUDA).

Native code trusts what it is given, so every entry point checks its tensors and
numbers here first and raises InvalidArgument naming the argument.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from ..errors import InvalidArgument


def vector(name: str, t, dtype: torch.dtype, numel: int | None = None, device: torch.device | None = None):
    """``t`` as a 1-D contiguous tensor of ``dtype`` (and ``numel`` elements, on ``device``)."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise InvalidArgument(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != 1:
        raise InvalidArgument(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise InvalidArgument(f"{name} must be contiguous")
    if device is not None and t.device != device:
        raise InvalidArgument(f"{name} is on {t.device}, the other arguments on {device}")
    if numel is not None and t.numel() != numel:
        raise InvalidArgument(f"{name} must have {numel} elements, got {t.numel()}")
    return t


def integer(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool):
        raise InvalidArgument(f"{name} must be an integer, got a bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise InvalidArgument(f"{name} must be an integer, got {type(value).__name__}") from None
    if v < low or (high is not None and v > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidArgument(f"{name} must be {bounds}, got {v}")
    return v


def flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgument(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def float32_value(v: float) -> float:
    """``v`` rounded to the nearest float32 (overflow gives inf, as a float32 cast)."""
    with np.errstate(over="ignore"):
        return float(np.float32(v))


def scale_value(scale) -> float:
    """A onebit scale, a number or a one-element tensor, as the float32 value every implementation uses."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise InvalidArgument(f"scale must be a number or a one-element tensor, got {scale.numel()} elements")
        scale = scale.item()  # may wait for the tensor's device
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise InvalidArgument(f"scale must be a real number, got {type(scale).__name__}")
    return float32_value(float(scale))
