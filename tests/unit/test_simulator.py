"""fmcomm.simulator on the ring all-reduce: results against independent references.

Floats are compared with a float64 reference within a stated rounding bound, integers
exactly (with two's-complement wrap-around, the reference in Python integers), and every
rank must end with the same bytes.
"""
import math

import numpy as np
import pytest
import torch

from numerics import gamma, to_float64, to_storage, wrap
from fmcomm import schedule, simulator
from fmcomm.algorithms import REGISTRY
from fmcomm.dtypes import DTYPES

WORLDS = range(1, 9)
COUNTS = (0, 1, 7, 1000)
OPS = ("sum", "avg", "min", "max", "prod")


def ring(world, count):
    return schedule.build("all_reduce", "ring", REGISTRY[("all_reduce", "ring")], world, count, count, count=count)






def make_inputs(rng, dtype, op, world, count):
    if not dtype.is_float:
        info = np.iinfo(dtype.numpy)
        return [rng.integers(info.min, info.max, size=count, endpoint=True, dtype=dtype.numpy)
                for _ in range(world)]
    if op == "prod":
        # +-(8+k)/8 * 2^e: 4 significant bits each, so the float64 product of up to 8 is
        # exact, and magnitudes stay within [2^-8, 2^8]: no overflow or underflow in any dtype.
        mant = rng.integers(8, 16, size=(world, count)) / 8.0
        vals = mant * np.exp2(rng.integers(-1, 1, size=(world, count))) * rng.choice([-1.0, 1.0], (world, count))
    else:
        vals = rng.uniform(-1, 1, size=(world, count)) * np.exp2(rng.integers(-6, 7, size=(world, count)))
    return [to_storage(v, dtype) for v in vals]




def int_reference(inputs, dtype, op, world):
    """Exact Python-integer arithmetic, wrapped to the dtype's width at the end."""
    bits = 8 * dtype.itemsize
    cols = zip(*[[int(v) for v in x] for x in inputs])
    out = []
    for col in cols:
        if op in ("sum", "avg"):
            v = wrap(sum(col), bits)
            if op == "avg" and world > 1:
                v = abs(v) // world * (1 if v >= 0 else -1)  # truncation toward zero
        elif op == "prod":
            v = wrap(math.prod(col), bits)
        else:
            v = min(col) if op == "min" else max(col)
        out.append(v)
    return np.array(out, dtype=dtype.numpy)




def float_reference_and_tolerance(inputs, dtype, op, world):
    xs = np.stack([to_float64(x, dtype) for x in inputs]) if inputs[0].size else np.zeros((world, 0))
    u = dtype.unit_roundoff
    tiny = float(torch.finfo(dtype.torch).smallest_normal * torch.finfo(dtype.torch).eps)  # smallest subnormal
    if op in ("min", "max"):
        return (xs.min(0) if op == "min" else xs.max(0)), 0.0  # picks an input: exact
    if op == "prod":
        # The float64 reference is exact here (see make_inputs); world-1 multiplications in
        # the dtype, each off by at most u relative: |error| <= gamma(world-1)*|ref|.
        ref = xs.prod(0)
        return ref, gamma(world - 1, u) * np.abs(ref)
    # fsum: the correctly rounded float64 value of the exact sum.
    ref = np.array([math.fsum(col) for col in xs.T])
    abs_sum = np.abs(xs).sum(0)
    if op == "sum":
        # world-1 correctly rounded additions in any order: |error| <= gamma(world-1)*sum|x|
        # (sums landing below the normal range are exact). The 2u|ref| term covers the
        # reference's own rounding (fsum, <= 2^-53 |ref|).
        return ref, gamma(world - 1, u) * abs_sum + 2 * u * np.abs(ref)
    if world == 1:
        return ref, 0.0  # avg of one rank is its input
    # avg = sum, then one division in the dtype: the sum's bound (gamma(world) absorbs the
    # second-order term of the division), 3u|ref| for the division and the reference's
    # two float64 roundings (fsum, /world), and one subnormal spacing where the quotient
    # lands below the normal range (the relative bound does not hold there).
    ref = ref / world
    return ref, gamma(world, u) * abs_sum / world + 3 * u * np.abs(ref) + tiny


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
def test_ring_all_reduce_matches_reference(world, count, dtype_name, op):
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng([world, count, dtype.code, len(op), ord(op[1])])
    inputs = make_inputs(rng, dtype, op, world, count)
    outs = simulator.simulate(ring(world, count), inputs, dtype, op)

    assert len(outs) == world
    for r, o in enumerate(outs):
        assert o.dtype == simulator.storage(dtype) and o.shape == (count,)
        assert o.tobytes() == outs[0].tobytes(), f"rank {r} ended with different bytes than rank 0"

    if not dtype.is_float:
        ref = int_reference(inputs, dtype, op, world)
        np.testing.assert_array_equal(outs[0], ref)
        return
    ref, tol = float_reference_and_tolerance(inputs, dtype, op, world)
    got = to_float64(outs[0], dtype)
    assert np.isfinite(got).all()
    err = np.abs(got - ref)
    bad = np.flatnonzero(err > tol)
    assert bad.size == 0, (f"{bad.size} elements outside tolerance; first at {bad[0]}: got {got[bad[0]]!r}, "
                           f"reference {ref[bad[0]]!r}, tolerance {np.broadcast_to(tol, ref.shape)[bad[0]]!r}")


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_contributes_exactly_once_to_every_element(world, count):
    # Rank r holds 16^r + i*2^32 at element i: the low 32 bits of the sum hold one 4-bit
    # digit per rank (how often rank r was added, up to 15, unambiguously), the high bits
    # (number of contributions) * i, which also catches elements moved to the wrong place.
    i = np.arange(count, dtype=np.int64)
    inputs = [np.int64(16) ** r + (i << 32) for r in range(world)]
    outs = simulator.simulate(ring(world, count), inputs, DTYPES["int64"], "sum")
    for rank, o in enumerate(outs):
        low, high = o & 0xFFFFFFFF, o >> 32
        for r in range(world):
            times = (low >> (4 * r)) & 0xF
            wrong = np.flatnonzero(times != 1)
            assert wrong.size == 0, (f"on rank {rank}, element {wrong[0]} got rank {r}'s input "
                                     f"{times[wrong[0]]} times")
        assert (low >> (4 * world) == 0).all(), "contribution from a rank outside the world"
        np.testing.assert_array_equal(high, world * i)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "int32"])
def test_out_of_place_gives_the_same_result_and_leaves_inputs_untouched(world, dtype_name):
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(world)
    inputs = make_inputs(rng, dtype, "sum", world, 37)
    before = [x.copy() for x in inputs]
    in_place = simulator.simulate(ring(world, 37), inputs, dtype, "sum", in_place=True)
    out_of_place = simulator.simulate(ring(world, 37), inputs, dtype, "sum", in_place=False)
    for x, b in zip(inputs, before):
        assert x.tobytes() == b.tobytes()
    for a, b in zip(in_place, out_of_place):
        assert a.tobytes() == b.tobytes()
        assert not any(np.shares_memory(a, x) for x in inputs)


def test_wrong_number_of_inputs_is_refused():
    with pytest.raises(ValueError, match="need 3 inputs"):
        simulator.simulate(ring(3, 4), [np.zeros(4, np.float32)] * 2, DTYPES["float32"], "sum")


@pytest.mark.parametrize("x, world, expected", [
    ([7, -7, 6, -6, 0, 5], 3, [2, -2, 2, -2, 0, 1]),
    ([-(2 ** 31), 2 ** 31 - 1], 2, [-(2 ** 30), 2 ** 30 - 1]),
])
def test_integer_avg_truncates_toward_zero(x, world, expected):
    got = simulator.finish_avg(np.array(x, dtype=np.int32), DTYPES["int32"], world)
    np.testing.assert_array_equal(got, expected)
