"""Conversions and bounds shared by the simulator and algorithm tests."""
import numpy as np
import torch


def to_storage(values: np.ndarray, dtype) -> np.ndarray:
    """float64/int values -> the simulator's storage (bfloat16 as uint16 bits), rounding to nearest."""
    if dtype.name == "bfloat16":
        return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return values.astype(dtype.numpy)


def to_float64(stored: np.ndarray, dtype) -> np.ndarray:
    if dtype.name == "bfloat16":
        return torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16).double().numpy()
    return stored.astype(np.float64)


def wrap(v: int, bits: int) -> int:
    half = 1 << (bits - 1)
    return (v + half) % (1 << bits) - half


def gamma(n, u):
    return n * u / (1 - n * u)
