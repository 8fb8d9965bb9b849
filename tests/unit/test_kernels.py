"""fmcomm.kernels: the native reduce kernels equal the torch fallback bit for bit, and the
simulator's NumPy combine() equals both.

Results are compared as raw bits; where both results are NaN only that is required
(NaN payloads and signs are not part of the contract).
"""
import os

import numpy as np
import pytest
import torch

from fmcomm import kernels, simulator
from fmcomm.dtypes import DTYPES
from fmcomm.kernels import Reducer

OPS = ("sum", "avg", "min", "max", "prod")
FLOATS = [n for n, d in DTYPES.items() if d.is_float]
HALVES = ("float16", "bfloat16")
BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

needs_native = pytest.mark.skipif(not kernels.native_available(),
                                  reason=f"fmcomm._C not built: {kernels.NATIVE_IMPORT_ERROR}")


def test_native_kernels_present_when_ci_expects_them():
    # FMCOMM_NATIVE=on (the README's test command) means "fail if not built".
    if os.environ.get("FMCOMM_NATIVE", "").lower() != "on":
        pytest.skip("FMCOMM_NATIVE=on is not set")
    assert kernels.native_available(), kernels.NATIVE_IMPORT_ERROR


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.element_size()])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, a=None, b=None):
    differ = bits(got) != bits(want)
    if got.is_floating_point():
        differ &= ~(got.isnan() & want.isnan())
    idx = differ.nonzero().flatten()[:5].tolist()
    detail = "" if a is None else f" a={a[idx].tolist()} b={b[idx].tolist()}"
    assert not idx, f"{differ.sum().item()} elements differ, first at {idx}: {got[idx].tolist()} vs {want[idx].tolist()}{detail}"


def random_tensor(dtype, n: int, g: torch.Generator, finite_only: bool = False) -> torch.Tensor:
    """Random elements of ``dtype``: for floats a mix of random bit patterns (all classes:
    subnormals, NaN payloads, infinities), ordinary values, and injected specials."""
    if not dtype.is_float:
        info = torch.iinfo(dtype.torch)
        x = torch.randint(info.min, info.max, (n,), dtype=dtype.torch, generator=g)
        x[torch.randint(0, n, (n // 20,), generator=g)] = info.max
        x[torch.randint(0, n, (n // 20,), generator=g)] = info.min
        x[torch.randint(0, n, (n // 20,), generator=g)] = -1
        return x
    ib = BITS[dtype.itemsize]
    info = torch.iinfo(ib)
    x = torch.randint(info.min, info.max, (n,), dtype=ib, generator=g).view(dtype.torch)
    ordinary = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    pick = torch.rand(n, generator=g) < 0.4
    x[pick] = ordinary[pick].to(dtype.torch)
    if finite_only:
        bad = ~torch.isfinite(x)
        x[bad] = ordinary[bad].to(dtype.torch)
        return x
    fi = torch.finfo(dtype.torch)
    specials = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
                             fi.smallest_normal * fi.eps, -fi.smallest_normal * fi.eps, fi.smallest_normal / 2,
                             fi.max, -fi.max, 1.0], dtype=torch.float64).to(dtype.torch)
    where = torch.randint(0, n, (n // 4,), generator=g)
    x[where] = specials[torch.randint(0, len(specials), (len(where),), generator=g)]
    return x


def reduce_both(dtype, op, a, b):
    native, fallback = torch.empty_like(a), torch.empty_like(a)
    Reducer(dtype, op, use_native=True)(native, a, b)
    Reducer(dtype, op, use_native=False)(fallback, a, b)
    return native, fallback


@needs_native
def test_reducer_really_uses_the_native_path():
    # float16 falls back to torch when the compiler has no _Float16; every other dtype must be native.
    for name, d in DTYPES.items():
        expected = name != "float16" or kernels._native.has_float16()
        assert Reducer(d, "sum", use_native=True).native is expected
        assert Reducer(d, "sum", use_native=False).native is False


@needs_native
@pytest.mark.parametrize("n", [1, 3, 17, 4099])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_native_equals_fallback_on_random_data(dtype_name, op, n):
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(1000 * dtype.code + 10 * len(op) + n)
    a, b = random_tensor(dtype, n, g), random_tensor(dtype, n, g)
    native, fallback = reduce_both(dtype, op, a, b)
    # Bit for bit, +0/-0 ties of min/max included: both paths return b on a tie.
    assert_same_bits(native, fallback, a, b)


@needs_native
@pytest.mark.parametrize("op", ["min", "max"])
@pytest.mark.parametrize("dtype_name", FLOATS)
def test_signed_zero_ties_in_the_tail(dtype_name, op):
    dtype = DTYPES[dtype_name]
    a = torch.tensor([0.0, -0.0, 0.0], dtype=dtype.torch)
    b = torch.tensor([-0.0, 0.0, 0.0], dtype=dtype.torch)
    native, fallback = reduce_both(dtype, op, a, b)
    assert_same_bits(native, fallback, a, b)


def half_constants(name):
    """A few fixed b values as raw 16-bit patterns: zeros, one, subnormal, max, inf, NaN, ordinary."""
    if name == "float16":
        return [0x0000, 0x8000, 0x3C00, 0xBE00, 0x0001, 0x8001, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x3555, 0x0400]
    return [0x0000, 0x8000, 0x3F80, 0xBFC0, 0x0001, 0x8001, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0x3EAB, 0x0080]


def all_half_patterns(dtype):
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype.torch)


@needs_native
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype_name", HALVES)
def test_native_equals_fallback_on_every_16_bit_pattern(dtype_name, op):
    dtype = DTYPES[dtype_name]
    a = all_half_patterns(dtype)
    for pattern in half_constants(dtype_name):
        b = torch.full_like(a, 0).view(torch.int16).fill_(np.int16(np.uint16(pattern))).view(dtype.torch)
        native, fallback = reduce_both(dtype, op, a, b)
        assert_same_bits(native, fallback, a, b)


@pytest.mark.parametrize("use_native", [pytest.param(True, marks=needs_native), False], ids=["native", "torch"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_destination_may_be_an_operand(dtype_name, op, use_native):
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(7 * dtype.code + len(op))
    a, b = random_tensor(dtype, 1029, g), random_tensor(dtype, 1029, g)
    reducer = Reducer(dtype, op, use_native)
    want = torch.empty_like(a)
    reducer(want, a, b)
    in_a, in_b = a.clone(), b.clone()
    reducer(in_a, in_a, b)
    reducer(in_b, a, in_b)
    assert_same_bits(in_a, want)
    assert_same_bits(in_b, want)


@pytest.mark.parametrize("use_native", [pytest.param(True, marks=needs_native), False], ids=["native", "torch"])
def test_empty_buffers_are_a_no_op(use_native):
    empty = torch.empty(0)
    Reducer(DTYPES["float32"], "sum", use_native)(empty, empty, empty)


@pytest.mark.parametrize("use_native", [pytest.param(True, marks=needs_native), False], ids=["native", "torch"])
@pytest.mark.parametrize("dtype_name", ["int32", "int64"])
def test_integer_sum_and_prod_wrap_around(dtype_name, use_native):
    dtype = DTYPES[dtype_name]
    info = torch.iinfo(dtype.torch)
    a = torch.tensor([info.max, info.min, info.max, 3], dtype=dtype.torch)
    b = torch.tensor([1, -1, info.max, info.max], dtype=dtype.torch)
    bits = 8 * dtype.itemsize
    wrap = lambda v: (v + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1))  # noqa: E731
    for op, f in (("sum", lambda x, y: x + y), ("prod", lambda x, y: x * y)):
        dst = torch.empty_like(a)
        Reducer(dtype, op, use_native)(dst, a, b)
        assert dst.tolist() == [wrap(f(x, y)) for x, y in zip(a.tolist(), b.tolist())]


@pytest.mark.parametrize("use_native", [pytest.param(True, marks=needs_native), False], ids=["native", "torch"])
@pytest.mark.parametrize("op", ["sum", "prod", "min", "max"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_simulator_combine_equals_reducer(dtype_name, op, use_native):
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(31 * dtype.code + len(op))
    a, b = random_tensor(dtype, 4099, g, finite_only=True), random_tensor(dtype, 4099, g, finite_only=True)
    dst = torch.empty_like(a)
    Reducer(dtype, op, use_native)(dst, a, b)
    if dtype.name == "bfloat16":
        to_np = lambda t: t.view(torch.int16).numpy().view(np.uint16)  # noqa: E731
    else:
        to_np = lambda t: t.numpy()  # noqa: E731
    got = simulator.combine(to_np(a), to_np(b), dtype, op)
    assert got.dtype == simulator.storage(dtype)
    sim = torch.from_numpy(got.view(np.int16)).view(torch.bfloat16) if dtype.name == "bfloat16" else torch.from_numpy(got)
    assert_same_bits(sim, dst, a, b)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_finish_avg(dtype_name):
    dtype = DTYPES[dtype_name]
    t = torch.tensor([7, -7, 6, 0], dtype=dtype.torch)
    kernels.finish_avg(t, 3)
    if dtype.is_float:
        want = torch.tensor([7, -7, 6, 0], dtype=dtype.torch) / 3
    else:
        want = torch.tensor([2, -2, 2, 0], dtype=dtype.torch)  # truncation toward zero
    assert_same_bits(t, want)
    one = torch.tensor([5, -5], dtype=dtype.torch)
    kernels.finish_avg(one, 1)
    assert one.tolist() == [5, -5]


def test_resolve_native():
    assert kernels.resolve_native("off") is False
    assert kernels.resolve_native("auto") is kernels.native_available()
    if kernels.native_available():
        assert kernels.resolve_native("on") is True
    else:
        with pytest.raises(kernels.ConfigError, match="FMCOMM_NATIVE=on"):
            kernels.resolve_native("on")
