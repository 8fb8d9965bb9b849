"""fmcomm.compression.kernels: the CPU native kernels equal the torch fallback bit for bit, and
the fallback does what the contract in the module's docstring says.

Tolerance: bit-exact. The contract fixes every float operation and its order (one IEEE
float32 step each, the 1-bit scale summed in a fixed lane order), so there is no rounding
freedom left that a tolerance could describe; any difference is a bug. Results are compared
as raw bits (int32/uint8 views); the 1-bit scale as the bits of its float32 value. One
exception, marked exact_nan=False where it applies: where an operation meets two NaNs
(x + residual with both NaN, a NaN minus a NaN decode, accumulating into a NaN), IEEE 754
leaves the result's payload and sign to the implementation and x86 takes them from whichever
operand the compiler put first, which neither torch nor GCC promises; there both results
must be NaN (NaN codes for fp8), nothing more. A NaN from one NaN operand keeps its exact bits.

Native comparisons run once per build of the native hot loops this CPU can run (AVX2 and
baseline x86-64), so the two builds are also checked to agree. They are skipped when fmcomm._C
is not built; the semantics tests run on the fallback always (and on native when built).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from fmcomm.compression import kernels
from fmcomm.errors import InvalidArgument, UnsupportedError

needs_native = pytest.mark.skipif(not kernels.native_available(),
                                  reason=f"fmcomm._C compression kernels not built: {kernels.NATIVE_IMPORT_ERROR}")
IMPLS = ["torch", pytest.param("native", marks=needs_native)]
SIZES = [0, 1, 7, 8, 9, 1000, (1 << 20) + 3]
FORMATS = ["e4m3", "e5m2"]
F32 = torch.float32


def native_builds() -> list[str]:
    """Builds of the native hot loops this CPU can run ("avx2", "default")."""
    if not kernels.native_available():
        return []
    from fmcomm import _C
    current = _C.compress_isa()
    found = [name for name in ("avx2", "default") if _C.set_compress_isa(name)]
    _C.set_compress_isa(current)
    return found


BUILDS = native_builds()


def each_isa():
    """Yields each native build's name with that build selected; restores the one before after."""
    from fmcomm import _C
    current = _C.compress_isa()
    try:
        for name in BUILDS:
            assert _C.set_compress_isa(name)
            yield name
    finally:
        _C.set_compress_isa(current)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 4: torch.int32}[t.element_size()])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str, source: torch.Tensor | None = None,
                     exact_nan: bool = True):
    """Raw bits equal; with exact_nan=False, places where both are NaN (both fp8 NaN codes for
    uint8) pass whatever their sign and payload (see the module docstring)."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    differ = bits(got) != bits(want)
    if not exact_nan:
        if got.dtype == torch.uint8:
            differ &= ~(((got & 0x7F) == 0x7F) & ((want & 0x7F) == 0x7F))
        else:
            differ &= ~(got.isnan() & want.isnan())
    if not differ.any():
        return
    where = differ.nonzero().flatten()
    i = where[:4].tolist()
    shown = "" if source is None else f" from inputs {[hex(v & 0xffffffff) for v in bits(source)[i].tolist()]}"
    raise AssertionError(f"{what}: {where.numel()} elements differ, first at {i}: "
                         f"{[hex(v & 0xffffffff) for v in bits(got)[i].tolist()]} vs "
                         f"{[hex(v & 0xffffffff) for v in bits(want)[i].tolist()]}{shown}")


def same_float32(a: float, b: float, exact_nan: bool = True) -> bool:
    if not exact_nan and math.isnan(a) and math.isnan(b):
        return True
    return float32_bits(a) == float32_bits(b)


def float32_bits(v: float) -> int:
    return int(np.float32(v).view(np.uint32))


def from_bits(patterns) -> torch.Tensor:
    """float32 tensor with the given uint32 bit patterns (ints, any sign convention)."""
    p = torch.as_tensor(patterns, dtype=torch.int64) & 0xFFFFFFFF
    return torch.where(p >= 1 << 31, p - (1 << 32), p).to(torch.int32).view(F32)


SPECIALS = from_bits([
    0x00000000, 0x80000000,  # +0, -0
    0x00000001, 0x80000001, 0x007FFFFF, 0x00400000,  # float32 subnormals
    0x00800000, 0x7F7FFFFF, 0xFF7FFFFF,  # smallest normal, +-max
    0x7F800000, 0xFF800000,  # +-inf
    0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFBFFFFF, 0x7FFFFFFF,  # NaNs: quiet, signalling, payloads
])


def random_floats(n: int, g: torch.Generator) -> torch.Tensor:
    """A mix of every float class: random bit patterns, ordinary values of many magnitudes,
    zeros of both signs and the specials above."""
    x = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, generator=g).view(F32)
    pick = torch.rand(n, generator=g)
    ordinary = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    x = torch.where(pick < 0.6, ordinary, x)
    x[pick > 0.95] = 0.0
    if n:
        where = torch.randint(0, n, (max(n // 10, 1),), generator=g)
        x[where] = SPECIALS[torch.randint(0, len(SPECIALS), (len(where),), generator=g)]
    return x


def finite_floats(n: int, g: torch.Generator) -> torch.Tensor:
    x = random_floats(n, g)
    return torch.where(torch.isfinite(x), x, torch.randn(n, generator=g))


def fp8_values(fmt: str) -> torch.Tensor:
    """All 256 codes decoded (float32, NaN included)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(kernels.FP8_FORMATS[fmt].dtype).to(F32)


def rounding_boundaries(fmt: str) -> torch.Tensor:
    """Every finite fp8 value, every midpoint between neighbours (exact in float32), the
    saturation edge, and their float32 neighbours 1-3 ulps away, both signs."""
    v = fp8_values(fmt)
    finite = torch.unique(v[torch.isfinite(v)].abs().double())
    top = kernels.FP8_FORMATS[fmt].max
    ulp_top = float(finite[-1] - finite[-2])
    points = torch.cat([finite, (finite[1:] + finite[:-1]) / 2,
                        torch.tensor([top + ulp_top / 2, top + ulp_top, 2 * top])]).float()
    p = bits(points).long()
    near = torch.cat([p + d for d in (-3, -2, -1, 0, 1, 2, 3)])
    near = near[near >= 0]
    return torch.cat([from_bits(near), -from_bits(near)])


def structured_patterns() -> torch.Tensor:
    """float32 patterns covering every sign and exponent with the top 8 mantissa bits
    enumerated (where fp8 rounds) and low bits that set or clear the sticky bits."""
    high = torch.arange(1 << 17, dtype=torch.int64) << 15
    low = torch.tensor([0, 1, 0x2000, 0x3FFF, 0x4000, 0x4001, 0x7FFE, 0x7FFF], dtype=torch.int64)
    return from_bits((high[:, None] | low[None, :]).flatten())


def block_scales(n: int, block: int, g: torch.Generator) -> torch.Tensor:
    """Positive finite scales of many magnitudes, one per block."""
    nb = -(-n // block)
    return (torch.rand(nb, generator=g) + 0.5) * torch.exp2(torch.randint(-20, 20, (nb,), generator=g).float())


def run_fp8_encode(impl, x, scale, block, fmt, residual=None):
    out = torch.empty(x.numel(), dtype=torch.uint8)
    r = None if residual is None else residual.clone()
    kernels.fp8_encode(x, out, scale, block, fmt, residual=r, impl=impl)
    return out, r


# ---------------------------------------------------------------------------------------
# Semantics (fallback always; native too when built)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_saturates_and_keeps_nan(fmt, impl):
    top = kernels.FP8_FORMATS[fmt].max
    x = torch.tensor([float("inf"), -float("inf"), 1e30, -1e30, top * 1.2, -top * 1.2, top, float("nan"),
                      -float("nan")])
    q, _ = run_fp8_encode(impl, x, torch.ones(1), x.numel(), fmt)
    max_code = {"e4m3": 0x7E, "e5m2": 0x7B}[fmt]
    assert q.tolist() == [max_code, max_code | 0x80] * 3 + [max_code, 0x7F, 0xFF]
    d = torch.empty(x.numel())
    kernels.fp8_decode(q, d, torch.ones(1), x.numel(), fmt, impl=impl)
    assert d[:7].tolist() == [top, -top] * 3 + [top]
    assert d[7:].isnan().all()


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_rounds_to_nearest_even(impl):
    # e4m3 steps: 1/8 between 1 and 2; 2^-9 below 2^-6 (subnormals).
    sub = 2.0 ** -9
    x = torch.tensor([1.0625, 1.1875, 1.0625 + 2**-20, -1.1875, 0.5 * sub, 1.5 * sub, 2.5 * sub, 0.25 * sub, -0.0,
                      2.0 ** -6 - 0.5 * sub])
    want = [1.0, 1.25, 1.125, -1.25, 0.0, 2 * sub, 2 * sub, 0.0, -0.0, 2.0 ** -6]
    q, _ = run_fp8_encode(impl, x, torch.ones(1), x.numel(), "e4m3")
    d = torch.empty(x.numel())
    kernels.fp8_decode(q, d, torch.ones(1), x.numel(), "e4m3", impl=impl)
    assert_same_bits(d, torch.tensor(want), "rounded values")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_blocks_and_residual_identity(fmt, impl):
    g = torch.Generator().manual_seed(5)
    n, block = 1000, 7
    x, r0 = torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.01
    scale = (torch.rand(-(-n // block), generator=g) + 0.5) * 32  # c * s mostly in the normal range
    q, r = run_fp8_encode(impl, x, scale, block, fmt, residual=r0)
    c = x + r0
    per_element = scale.repeat_interleave(block)[:n]
    fp8 = kernels.FP8_FORMATS[fmt]
    assert torch.equal(q, torch.clamp(c * per_element, -fp8.max, fp8.max).to(fp8.dtype).view(torch.uint8))
    d = torch.empty(n)
    kernels.fp8_decode(q, d, scale, block, fmt, impl=impl)
    assert_same_bits(d, q.view(fp8.dtype).float() / per_element, "decode")
    assert_same_bits(r, c - d, "residual = c - decode")
    # c - d is exact wherever d is within a factor 2 of c (Sterbenz), so there c == d + residual.
    exact = (d.sign() == c.sign()) & (d.abs() * 2 >= c.abs()) & (c.abs() * 2 >= d.abs())
    assert exact.float().mean() > 0.9
    assert_same_bits((d + r)[exact], c[exact], "c == decode + residual")
    acc = torch.randn(n, generator=g)
    want = acc + d
    kernels.fp8_decode(q, acc, scale, block, fmt, accumulate=True, impl=impl)
    assert_same_bits(acc, want, "accumulate")


@pytest.mark.parametrize("impl", IMPLS)
def test_onebit_signs_scale_and_residual(impl):
    x = torch.tensor([1.5, -2.0, 0.0, -0.0, 3.0, -0.25, 7.0, -1.0, 4.0, -8.0])
    r0 = torch.tensor([0.5, 0.0, -1.0, -0.0, -3.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    c = x + r0  # [2, -2, -1, -0.0, 0, -0.25, 8, -1, 4, -8]
    assert bits(c)[3] == -2**31  # -0.0 really
    out = torch.full((2,), 0xFF, dtype=torch.uint8)
    r = r0.clone()
    scale = kernels.onebit_encode(x, out, residual=r, impl=impl)
    assert out.tolist() == [0b10100110, 0b10]  # -0.0 is not negative; unused high bits cleared
    lanes = [0.0] * 8
    for i, v in enumerate(c.tolist()):
        lanes[i % 8] += abs(v)
    total = lanes[0]
    for lane in lanes[1:]:
        total += lane
    assert float32_bits(scale) == float32_bits(total / len(c)) and scale == float(np.float32(scale))
    s = torch.tensor(scale)
    assert_same_bits(r, c - torch.where(c < 0, -s, s), "residual")
    d = torch.empty(len(c))
    kernels.onebit_decode(out, d, scale, impl=impl)
    assert_same_bits(d, torch.where(c < 0, -s, s), "decode")
    kernels.onebit_decode(out, d, scale, accumulate=True, impl=impl)
    assert_same_bits(d, 2 * torch.where(c < 0, -s, s), "accumulate")
    assert kernels.onebit_encode(torch.empty(0), torch.empty(0, dtype=torch.uint8), impl=impl) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_onebit_scale_is_a_float32_rounding(impl):
    x = torch.tensor([0.1, 0.2, 0.3])  # mean |x| is not a float32 value: rounded once, from float64
    scale = kernels.onebit_encode(x, torch.empty(1, dtype=torch.uint8), impl=impl)
    a, b, c = (float(v) for v in x)
    assert float32_bits(scale) == float32_bits((((a + b) + c) + 0.0) / 3) and scale == float(np.float32(scale))
    d = torch.empty(3)
    kernels.onebit_decode(torch.zeros(1, dtype=torch.uint8), d, 0.1, impl=impl)  # 0.1 rounds to float32
    assert d.tolist() == [float(np.float32(0.1))] * 3


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_ties_go_to_the_lower_index(impl):
    x = torch.tensor([1.0, -1.0, 1.0, -2.0, 2.0, -0.0, 0.0, -1.0])
    for k, want in [(0, []), (1, [3]), (2, [3, 4]), (3, [0, 3, 4]), (5, [0, 1, 2, 3, 4]),
                    (7, [0, 1, 2, 3, 4, 5, 7]), (8, list(range(8)))]:
        idx, val = torch.empty(k, dtype=torch.int32), torch.empty(k)
        r0 = torch.zeros(8)
        r = r0.clone()
        kernels.topk_select(x, k, idx, val, residual=r, impl=impl)
        assert idx.tolist() == want, k
        c = x + r0  # -0.0 + 0.0 is +0.0
        assert_same_bits(val, c[want], "values")
        kept = c.clone()
        kept[want] = 0.0
        assert_same_bits(r, kept, "residual")  # selected entries become +0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_ranks_nan_first_and_does_not_hang(impl):
    x = torch.tensor([1.0, float("nan"), 5.0, -float("nan"), float("inf")])
    idx, val = torch.empty(3, dtype=torch.int32), torch.empty(3)
    kernels.topk_select(x, 3, idx, val, impl=impl)
    assert idx.tolist() == [1, 3, 4]


@pytest.mark.parametrize("impl", IMPLS)
def test_scatter_add(impl):
    out = torch.tensor([1.0, 2.0, 3.0, 4.0])
    kernels.scatter_add(torch.tensor([3, 0], dtype=torch.int32), torch.tensor([0.5, -1.0]), out, impl=impl)
    assert out.tolist() == [0.0, 2.0, 3.0, 4.5]
    kernels.scatter_add(torch.empty(0, dtype=torch.int32), torch.empty(0), out, impl=impl)


# ---------------------------------------------------------------------------------------
# Argument checks


def test_argument_errors_raise_invalid_argument():
    x, u8, one = torch.zeros(16), torch.zeros(16, dtype=torch.uint8), torch.ones(1)
    i32, f = torch.zeros(2, dtype=torch.int32), torch.zeros(2)
    k = kernels
    bad = [
        ("x must be torch.float32", lambda impl: k.fp8_encode(x.double(), u8, one, 16, "e4m3", impl=impl)),
        ("x must be 1-D", lambda impl: k.fp8_encode(x.view(4, 4), u8, one, 16, "e4m3", impl=impl)),
        ("x must be contiguous", lambda impl: k.fp8_encode(torch.zeros(32)[::2], u8, one, 16, "e4m3", impl=impl)),
        ("x must be a torch.Tensor", lambda impl: k.fp8_encode([0.0], u8, one, 16, "e4m3", impl=impl)),
        ("out_u8 must have 16", lambda impl: k.fp8_encode(x, u8[:8], one, 16, "e4m3", impl=impl)),
        ("scale_f32 must have 2", lambda impl: k.fp8_encode(x, u8, one, 8, "e4m3", impl=impl)),
        ("block must be >= 1", lambda impl: k.fp8_encode(x, u8, one, 0, "e4m3", impl=impl)),
        ("block must be an integer", lambda impl: k.fp8_encode(x, u8, one, 16.0, "e4m3", impl=impl)),
        ("fmt must be one of", lambda impl: k.fp8_encode(x, u8, one, 16, "e3m4", impl=impl)),
        ("residual must have 16", lambda impl: k.fp8_encode(x, u8, one, 16, "e4m3", torch.zeros(8), impl=impl)),
        ("residual overlaps x", lambda impl: k.fp8_encode(x, u8, one, 16, "e4m3", x, impl=impl)),
        ("q_u8 must be torch.uint8", lambda impl: k.fp8_decode(x, x, one, 16, "e4m3", impl=impl)),
        ("accumulate must be a bool", lambda impl: k.fp8_decode(u8, x, one, 16, "e4m3", 1, impl=impl)),
        ("out_f32 overlaps q_u8", lambda impl: k.fp8_decode(x.view(torch.uint8)[:16], x, one, 16, "e4m3", impl=impl)),
        ("out_u8 must have 2", lambda impl: k.onebit_encode(x, u8, impl=impl)),
        ("out_u8 overlaps x", lambda impl: k.onebit_encode(x, x.view(torch.uint8)[:2], impl=impl)),
        ("bits_u8 must have 2", lambda impl: k.onebit_decode(u8, x, 1.0, impl=impl)),
        ("scale must be a real number", lambda impl: k.onebit_decode(u8[:2], x, "1", impl=impl)),
        ("k must be in \\[0, 16\\], got 17", lambda impl: k.topk_select(x, 17, i32, f, impl=impl)),
        ("k must be in \\[0, 16\\], got -1", lambda impl: k.topk_select(x, -1, i32, f, impl=impl)),
        ("k must be an integer", lambda impl: k.topk_select(x, 2.0, i32, f, impl=impl)),
        ("idx_out_i32 must be torch.int32", lambda impl: k.topk_select(x, 2, i32.long(), f, impl=impl)),
        ("val_out_f32 must have 2", lambda impl: k.topk_select(x, 2, i32, f[:1], impl=impl)),
        ("idx_i32 holds 16, outside", lambda impl: k.scatter_add(torch.tensor([0, 16], dtype=torch.int32), f, x,
                                                                 impl=impl)),
        ("idx_i32 holds -1, outside", lambda impl: k.scatter_add(torch.tensor([-1, 0], dtype=torch.int32), f, x,
                                                                 impl=impl)),
        ("val_f32 must have 2", lambda impl: k.scatter_add(i32, f[:1], x, impl=impl)),
    ]
    # Checks come before the implementation is chosen: the same errors whatever impl says.
    for message, call in bad:
        for impl in (None, "torch", "native"):
            with pytest.raises(InvalidArgument, match=message):
                call(impl)
    with pytest.raises(InvalidArgument, match="impl must be one of"):
        k.fp8_encode(x, u8, one, 16, "e4m3", impl="cuda")


def test_unbuilt_native_falls_back_or_refuses(monkeypatch):
    monkeypatch.setattr(kernels, "_native", None)
    x, out = torch.tensor([1.0, -1.0]), torch.empty(1, dtype=torch.uint8)
    assert kernels.onebit_encode(x, out) == 1.0  # impl=None: the torch fallback
    with pytest.raises(UnsupportedError, match="impl='native'"):
        kernels.onebit_encode(x, out, impl="native")


def test_cuda_tensors_go_to_the_cuda_kernels_when_they_say_available(monkeypatch):
    # Only the choice is tested here (no GPU needed): tests/unit/test_cuda_kernels.py runs them.
    import sys
    import types

    import fmcomm.compression as package
    fake = types.ModuleType("fmcomm.compression.cuda_kernels")
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(package, "cuda_kernels", fake, raising=False)
    cuda = torch.device("cuda", 0)
    fake.available = lambda: True
    assert kernels._backend(None, cuda, "topk_select") is fake
    assert kernels._backend("native", cuda, "topk_select") is fake
    assert kernels._backend("torch", cuda, "topk_select") == "torch"
    fake.available = lambda: False
    assert kernels._backend(None, cuda, "topk_select") == "torch"
    with pytest.raises(UnsupportedError, match="cuda_kernels are not available"):
        kernels._backend("native", cuda, "topk_select")


def test_native_kernels_present_when_ci_expects_them():
    # FMCOMM_NATIVE=on (the README's test command) means "fail if not built".
    if os.environ.get("FMCOMM_NATIVE", "").lower() != "on":
        pytest.skip("FMCOMM_NATIVE=on is not set")
    assert kernels.native_available(), kernels.NATIVE_IMPORT_ERROR


@needs_native
def test_the_baseline_build_is_tested_too():
    assert "default" in BUILDS
    from fmcomm import _C
    assert not _C.set_compress_isa("sse9")


@needs_native
def test_cpu_tensors_go_native_by_default():
    assert kernels._backend(None, torch.device("cpu"), "fp8_encode") == "cpu"
    assert kernels._backend("torch", torch.device("cpu"), "fp8_encode") == "torch"


# ---------------------------------------------------------------------------------------
# Native equals the fallback, bit for bit, in every build


@needs_native
@pytest.mark.parametrize("fmt", FORMATS)
def test_native_fp8_encode_on_rounding_boundaries_and_all_classes(fmt):
    # Boundaries exactly, then every sign/exponent/rounding-bit combination (NaN and inf
    # patterns included), then 4M random bit patterns, at scale 1 and a non-power-of-two scale.
    g = torch.Generator().manual_seed(11)
    cases = {"boundaries": rounding_boundaries(fmt), "structured": structured_patterns(),
             "random": torch.randint(-2**31, 2**31 - 1, (1 << 22,), dtype=torch.int32, generator=g).view(F32)}
    for name, x in cases.items():
        for s in (1.0, 0.7):
            scale = torch.tensor([s])
            want, _ = run_fp8_encode("torch", x, scale, x.numel(), fmt)
            for isa in each_isa():
                got, _ = run_fp8_encode("native", x, scale, x.numel(), fmt)
                assert_same_bits(got, want, f"{fmt} {name} scale {s} [{isa}]", x)


@needs_native
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", SIZES)
def test_native_fp8_encode_equals_fallback(n, fmt):
    g = torch.Generator().manual_seed(n)
    x, r0 = random_floats(n, g), random_floats(n, g)
    for block in sorted({1, 7, 256, max(n, 1)}):
        if n > 100_000 and block == 1:
            continue  # one float op per element either way; block 1 is covered at the smaller sizes
        scale = block_scales(n, block, g)
        for residual in (None, r0):
            want_q, want_r = run_fp8_encode("torch", x, scale, block, fmt, residual)
            for isa in each_isa():
                got_q, got_r = run_fp8_encode("native", x, scale, block, fmt, residual)
                what = f"n={n} block={block} residual={residual is not None} [{isa}]"
                # With a residual, NaN codes and residuals come from x + residual and from a NaN
                # minus the NaN decode: operations on two NaNs.
                two_nans = residual is None
                assert_same_bits(got_q, want_q, "codes " + what, x, exact_nan=two_nans)
                if residual is not None:
                    assert_same_bits(got_r, want_r, "residual " + what, x, exact_nan=False)


@needs_native
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", SIZES)
def test_native_fp8_decode_equals_fallback(n, fmt):
    g = torch.Generator().manual_seed(100 + n)
    codes = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    codes[: min(n, 256)] = torch.arange(min(n, 256), dtype=torch.int32).to(torch.uint8)  # every code, NaNs too
    acc0 = random_floats(n, g)
    for block in sorted({1, 7, 256, max(n, 1)}):
        if n > 100_000 and block == 1:
            continue
        scale = block_scales(n, block, g)
        for accumulate in (False, True):
            want = acc0.clone()
            kernels.fp8_decode(codes, want, scale, block, fmt, accumulate=accumulate, impl="torch")
            for isa in each_isa():
                got = acc0.clone()
                kernels.fp8_decode(codes, got, scale, block, fmt, accumulate=accumulate, impl="native")
                assert_same_bits(got, want, f"n={n} block={block} accumulate={accumulate} [{isa}]",
                                 exact_nan=not accumulate)  # accumulating: NaN + NaN


@needs_native
@pytest.mark.parametrize("n", SIZES)
def test_native_onebit_equals_fallback(n):
    g = torch.Generator().manual_seed(200 + n)
    datasets = {"random finite": finite_floats(n, g), "all classes": random_floats(n, g)}
    r0 = finite_floats(n, g)
    nbytes = -(-n // 8)
    for name, x in datasets.items():
        for residual in (None, r0):
            want_bits = torch.full((nbytes,), 0xAA, dtype=torch.uint8)
            want_r = None if residual is None else residual.clone()
            want_scale = kernels.onebit_encode(x, want_bits, residual=want_r, impl="torch")
            for isa in each_isa():
                got_bits = torch.full((nbytes,), 0x55, dtype=torch.uint8)
                got_r = None if residual is None else residual.clone()
                got_scale = kernels.onebit_encode(x, got_bits, residual=got_r, impl="native")
                what = f"n={n} {name} residual={residual is not None} [{isa}]"
                assert_same_bits(got_bits, want_bits, "bits " + what)
                # A NaN scale is a sum that met NaNs in the lanes: two-NaN additions.
                assert same_float32(got_scale, want_scale, exact_nan=False), (what, got_scale, want_scale)
                if residual is not None:
                    assert_same_bits(got_r, want_r, "residual " + what, exact_nan=False)
        acc0 = random_floats(n, g)
        for scale in (want_scale, 0.1, 1e-40, 3e38):
            for accumulate in (False, True):
                want = acc0.clone()
                kernels.onebit_decode(want_bits, want, scale, accumulate=accumulate, impl="torch")
                for isa in each_isa():
                    got = acc0.clone()
                    kernels.onebit_decode(want_bits, got, scale, accumulate=accumulate, impl="native")
                    assert_same_bits(got, want, f"decode n={n} scale={scale} accumulate={accumulate} [{isa}]",
                                     exact_nan=not accumulate)


def topk_datasets(n: int, g: torch.Generator) -> dict:
    ties = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 0.0, -0.0])
    # Large exactly where the native kernel's strided sample of 65536 looks and tiny elsewhere:
    # the sample's thresholds let too few through, so it retries and then ranks everything.
    sampled = torch.full((n,), 1e-3)
    sampled[torch.arange(min(n, 65536)) * n // min(n, 65536)] = 5.0
    return {
        "normal": torch.randn(n, generator=g),
        "all classes finite": finite_floats(n, g),
        "heavy ties": ties[torch.randint(0, len(ties), (n,), generator=g)],
        "all equal": torch.full((n,), -3.0),
        "sample adversary": sampled,
    }


@needs_native
@pytest.mark.parametrize("n", SIZES)
def test_native_topk_equals_fallback(n):
    g = torch.Generator().manual_seed(300 + n)
    r0 = torch.randn(n, generator=g) * 0.5
    ks = sorted({min(k, n) for k in (0, 1, n // 100, n // 10, n // 2, n - 1, n) if k >= 0})
    for name, x in topk_datasets(n, g).items():
        if n > 100_000 and name in ("all equal", "all classes finite"):
            continue  # the small sizes cover these shapes; the big one is for the sampled paths
        for k in ks:
            for residual in (None, r0 if name != "sample adversary" else torch.zeros(n)):
                want_idx, want_val = torch.empty(k, dtype=torch.int32), torch.empty(k)
                want_r = None if residual is None else residual.clone()
                kernels.topk_select(x, k, want_idx, want_val, residual=want_r, impl="torch")
                for isa in each_isa():
                    got_idx, got_val = torch.full((k,), -1, dtype=torch.int32), torch.empty(k)
                    got_r = None if residual is None else residual.clone()
                    kernels.topk_select(x, k, got_idx, got_val, residual=got_r, impl="native")
                    what = f"n={n} k={k} {name} residual={residual is not None} [{isa}]"
                    assert torch.equal(got_idx, want_idx), "indices " + what
                    assert_same_bits(got_val, want_val, "values " + what)  # inputs are finite here
                    if residual is not None:
                        assert_same_bits(got_r, want_r, "residual " + what)


@needs_native
def test_native_topk_with_nan_matches_fallback():
    g = torch.Generator().manual_seed(7)
    x = random_floats(5000, g)  # NaN and inf included: outside the contract's inputs, but must not break
    for k in (0, 1, 50, 2500, 5000):
        want_idx, want_val = torch.empty(k, dtype=torch.int32), torch.empty(k)
        kernels.topk_select(x, k, want_idx, want_val, impl="torch")
        for isa in each_isa():
            got_idx, got_val = torch.empty(k, dtype=torch.int32), torch.empty(k)
            kernels.topk_select(x, k, got_idx, got_val, impl="native")
            assert torch.equal(got_idx, want_idx), (k, isa)
            assert_same_bits(got_val, want_val, f"values k={k} [{isa}]")


@needs_native
@pytest.mark.parametrize("n", SIZES)
def test_native_scatter_add_equals_fallback(n):
    g = torch.Generator().manual_seed(400 + n)
    out0 = random_floats(n, g)
    for m in sorted({0, min(n, 1), n // 100, n}):
        idx = torch.randperm(n, generator=g)[:m].to(torch.int32)
        val = random_floats(m, g)
        want = out0.clone()
        kernels.scatter_add(idx, val, want, impl="torch")
        got = out0.clone()
        kernels.scatter_add(idx, val, got, impl="native")
        assert_same_bits(got, want, f"n={n} m={m}", exact_nan=False)  # out and val may both be NaN
