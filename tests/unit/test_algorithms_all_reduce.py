"""All-reduce schedules (ring, recursive doubling, Rabenseifner, double binary tree):
well formed, correct in place and out of place, byte-identical on every rank, every
rank's input counted exactly once, and their documented traffic and round counts.

Floats are compared with a float64 reference within a rounding bound that holds for
any order of the world-1 operations (so it holds for every algorithm), integers
exactly with two's-complement wrap-around (the reference in Python integers).

The helpers below repeat those of test_simulator.py on purpose: this file must not
change when that one does.
"""
import functools
import math

import numpy as np
import pytest
import torch

from numerics import gamma, to_float64, to_storage, wrap
from fmcomm import schedule, simulator
from fmcomm.algorithms import halving_doubling, recursive_doubling, ring, tree
from fmcomm.dtypes import DTYPES
from fmcomm.schedule import Send, validate

WORLDS = range(1, 9)
COUNTS = (0, 1, 2, 7, 8, 9, 1000, 4099)
OPS = ("sum", "avg", "min", "max", "prod")

# The tree's default is one chunk per half for all of COUNTS (they are small), so the
# pipeline is exercised with explicit chunk counts too: 3 (uneven pieces) and 8 (the
# maximum; most pieces are empty for the small counts).
ALGOS = {
    "ring": ring.all_reduce,
    "recursive_doubling": recursive_doubling.all_reduce,
    "halving_doubling": halving_doubling.all_reduce,
    "tree": tree.all_reduce,
    "tree-chunks3": functools.partial(tree.all_reduce, chunks=3),
    "tree-chunks8": functools.partial(tree.all_reduce, chunks=8),
}


@functools.lru_cache(maxsize=None)
def build(algo: str, world: int, count: int) -> schedule.Schedule:
    sched = schedule.build("all_reduce", algo, ALGOS[algo], world, count, count, count=count)
    validate(sched)
    return sched


# ------------------------------------------------------------------ helpers





def make_inputs(rng, dtype, op, world, count):
    if not dtype.is_float:
        info = np.iinfo(dtype.numpy)
        return [rng.integers(info.min, info.max, size=count, endpoint=True, dtype=dtype.numpy)
                for _ in range(world)]
    if op == "prod":
        # +-(8+k)/8 * 2^e, e in {-1, 0}: 4 significant bits each, so the float64 product of
        # up to 8 is exact and no dtype overflows or underflows.
        mant = rng.integers(8, 16, size=(world, count)) / 8.0
        vals = mant * np.exp2(rng.integers(-1, 1, size=(world, count))) * rng.choice([-1.0, 1.0], (world, count))
    else:
        vals = rng.uniform(-1, 1, size=(world, count)) * np.exp2(rng.integers(-6, 7, size=(world, count)))
    return [to_storage(v, dtype) for v in vals]




def int_reference(inputs, dtype, op, world):
    bits = 8 * dtype.itemsize
    out = []
    for col in zip(*[x.tolist() for x in inputs]):
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
    """The float64 reference and the rounding bound, valid for any order of operations."""
    count = inputs[0].size
    xs = np.stack([to_float64(x, dtype) for x in inputs]) if count else np.zeros((world, 0))
    u = dtype.unit_roundoff
    tiny = float(torch.finfo(dtype.torch).smallest_normal * torch.finfo(dtype.torch).eps)
    if op in ("min", "max"):
        return (xs.min(0) if op == "min" else xs.max(0)), 0.0
    if op == "prod":
        ref = xs.prod(0)  # exact (see make_inputs); world-1 roundings of u relative each
        return ref, gamma(world - 1, u) * np.abs(ref)
    ref = np.array([math.fsum(col) for col in xs.T])
    abs_sum = np.abs(xs).sum(0)
    if op == "sum":
        # world-1 correctly rounded additions, in any order (tree or chain):
        # |error| <= gamma(world-1) * sum|x|; 2u|ref| for fsum's own rounding.
        return ref, gamma(world - 1, u) * abs_sum + 2 * u * np.abs(ref)
    if world == 1:
        return ref, 0.0
    ref = ref / world
    return ref, gamma(world, u) * abs_sum / world + 3 * u * np.abs(ref) + tiny


def assert_identical_on_every_rank(outs, count, dtype, what):
    for r, o in enumerate(outs):
        assert o.dtype == simulator.storage(dtype) and o.shape == (count,)
        assert o.tobytes() == outs[0].tobytes(), f"{what}: rank {r} ended with different bytes than rank 0"


@functools.lru_cache(maxsize=None)
def case(world, count, dtype_name, op):
    """Inputs and reference (with tolerance; None for integers) of one case, shared by
    every algorithm (the references are the slow part)."""
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng([world, count, dtype.code, len(op), ord(op[1])])
    inputs = make_inputs(rng, dtype, op, world, count)
    if not dtype.is_float:
        return inputs, int_reference(inputs, dtype, op, world), None
    return (inputs, *float_reference_and_tolerance(inputs, dtype, op, world))


# ------------------------------------------------------------- correctness

@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_matches_reference_in_and_out_of_place(algo, world, count):
    sched = build(algo, world, count)  # validate() runs in build
    for dtype in DTYPES.values():
        for op in OPS:
            inputs, ref, tol = case(world, count, dtype.name, op)
            results = {ip: simulator.simulate(sched, inputs, dtype, op, in_place=ip) for ip in (True, False)}
            what = f"{dtype.name} {op}"
            outs = results[True]
            assert_identical_on_every_rank(outs, count, dtype, what + " in place")
            assert_identical_on_every_rank(results[False], count, dtype, what + " out of place")
            assert outs[0].tobytes() == results[False][0].tobytes(), f"{what}: in place differs from out of place"
            if not dtype.is_float:
                np.testing.assert_array_equal(outs[0], ref, err_msg=what)
                continue
            got = to_float64(outs[0], dtype)
            assert np.isfinite(got).all(), what
            err = np.abs(got - ref)
            bad = np.flatnonzero(err > tol)
            assert bad.size == 0, (f"{what}: {bad.size} elements outside tolerance; first at {bad[0]}: "
                                   f"got {got[bad[0]]!r}, reference {ref[bad[0]]!r}, "
                                   f"tolerance {np.broadcast_to(tol, ref.shape)[bad[0]]!r}")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_ties_and_nans_give_identical_bytes(algo, world):
    # min/max pick an operand, and which one depends on operand order where they tie:
    # min(+0, -0) is -0 but min(-0, +0) is +0, and of two NaNs the first wins. Two ranks
    # that reduced the same element with the operands swapped end with different bytes,
    # even for float sum -- so this is where a careless recursive doubling shows.
    count = 1000
    sched = build(algo, world, count)
    rng = np.random.default_rng(world)
    for name in ("float32", "float16", "bfloat16"):
        dtype = DTYPES[name]
        vals = np.array([0.0, -0.0, 1.0, -1.0, np.nan])
        inputs = []
        for r in range(world):
            x = to_storage(rng.choice(vals, size=count, p=[0.35, 0.35, 0.1, 0.1, 0.1]), dtype)
            # Give each rank's NaNs their own payload, so which NaN survives is visible.
            nan = np.isnan(to_float64(x, dtype))
            bits = x.view(np.uint32 if dtype.itemsize == 4 else np.uint16)
            bits[nan] |= r + 1
            inputs.append(x)
        for op in ("min", "max", "sum"):
            for ip in (True, False):
                outs = simulator.simulate(sched, inputs, dtype, op, in_place=ip)
                assert_identical_on_every_rank(outs, count, dtype, f"{name} {op} in_place={ip}")
            xs = np.stack([to_float64(x, dtype) for x in inputs])
            got = to_float64(outs[0], dtype)
            nan = np.isnan(xs).any(0)
            assert (np.isnan(got) == nan).all(), f"{name} {op}: NaN must propagate"
            if op != "sum":
                ref = xs.min(0) if op == "min" else xs.max(0)
                np.testing.assert_array_equal(got[~nan], ref[~nan])  # +0 == -0 here


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_every_rank_contributes_exactly_once_to_every_element(algo, world, count):
    # Rank r holds 16^r + i*2^32 at element i: the low 32 bits of the sum hold one 4-bit
    # digit per rank (how often rank r was added), the high bits (contributions) * i,
    # which also catches elements moved to the wrong place.
    sched = build(algo, world, count)
    i = np.arange(count, dtype=np.int64)
    inputs = [np.int64(16) ** r + (i << 32) for r in range(world)]
    for ip in (True, False):
        outs = simulator.simulate(sched, inputs, DTYPES["int64"], "sum", in_place=ip)
        for rank, o in enumerate(outs):
            low, high = o & 0xFFFFFFFF, o >> 32
            for r in range(world):
                times = (low >> (4 * r)) & 0xF
                wrong = np.flatnonzero(times != 1)
                assert wrong.size == 0, (f"in_place={ip}: on rank {rank}, element {wrong[0]} got rank {r}'s "
                                         f"input {times[wrong[0]]} times")
            assert (low >> (4 * world) == 0).all(), "contribution from a rank outside the world"
            np.testing.assert_array_equal(high, world * i)


@pytest.mark.parametrize("algo", ALGOS)
def test_world_one_is_a_single_copy(algo):
    (rs,) = build(algo, 1, 5).ranks
    assert rs.rounds == ((schedule.Copy(schedule.Range("output", 0, 5), schedule.Range("input", 0, 5)),),)
    assert build(algo, 1, 0).ranks[0].rounds == ()


# --------------------------------------------------- rounds and traffic

def lg(x: int) -> int:
    return x.bit_length() - 1


def expected_rounds(algo: str, world: int, count: int) -> int:
    if world == 1:
        return 1 if count else 0
    core = 1 << lg(world)
    fold = 0 if core == world else 2
    if algo == "ring":
        return 2 * (world - 1)
    if algo == "recursive_doubling":
        # p = 2: the one exchange sends the input, so may not write the output; a local copy follows.
        return lg(core) + fold + (1 if world == 2 else 0)
    if algo == "halving_doubling":
        return 2 * lg(core) + fold
    chunks = {"tree": tree.default_chunks(count), "tree-chunks3": 3, "tree-chunks8": 8}[algo]
    return chunks + 2 * lg(world) - 1


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_round_count(algo, world, count):
    # Empty rounds are kept, so every rank has the same number (the α term of the cost).
    rounds = {len(rs.rounds) for rs in build(algo, world, count).ranks}
    assert rounds == {expected_rounds(algo, world, count)}


def sent_elements(algo, world, count):
    return [rs.bytes_sent(8) // 8 for rs in build(algo, world, count).ranks]


BYTES_COUNTS = COUNTS + (1_000_003,)


@pytest.mark.parametrize("count", BYTES_COUNTS)
@pytest.mark.parametrize("world", WORLDS)
def test_recursive_doubling_bytes_sent(world, count):
    # Documented: core ranks n lg p' (+ n with an extra partner), extra ranks n; exact.
    core = 1 << lg(world)
    for rank, sent in enumerate(sent_elements("recursive_doubling", world, count)):
        if rank >= core:
            assert sent == count
        else:
            assert sent == count * lg(core) + (count if rank + core < world else 0)


@pytest.mark.parametrize("count", BYTES_COUNTS)
@pytest.mark.parametrize("world", WORLDS)
def test_halving_doubling_bytes_sent(world, count):
    # Documented, with chunk rounding: a core rank sends n - |own chunk| in the
    # reduce-scatter and p'-1 chunks of floor or ceil(n/p') in the all-gather, plus n for
    # the unfold if it has an extra partner; an extra rank sends n. Over all core ranks
    # the two halves send exactly 2(p'-1)n.
    core = 1 << lg(world)
    lo, hi = count // core, -(-count // core)
    sent = sent_elements("halving_doubling", world, count)
    core_total = 0
    for rank, s in enumerate(sent):
        if rank >= core:
            assert s == count
            continue
        s -= count if rank + core < world else 0
        assert count - hi + (core - 1) * lo <= s <= count - lo + (core - 1) * hi
        assert abs(s - 2 * (core - 1) / core * count) < core  # the bound above, loosened
        core_total += s
    assert core_total == 2 * (core - 1) * count


@pytest.mark.parametrize("count", BYTES_COUNTS)
@pytest.mark.parametrize("world", range(1, 17))
@pytest.mark.parametrize("chunks", [None, 1, 3, 8])
def test_tree_bytes_sent(world, count, chunks):
    # Documented: on tree t a rank sends its half h_t (chunk_bounds(n, 2)) once to its
    # parent and once to each child; chunking does not change it. So a rank sends at
    # most 4*ceil(n/2) <= 2n + 2 elements, and all ranks together exactly 2(p-1)n.
    fn = functools.partial(tree.all_reduce, chunks=chunks)
    sched = schedule.build("all_reduce", "tree", fn, world, count, count, count=count)
    halves = [m for _, m in schedule.chunk_bounds(count, 2)]
    trees = tree.double_binary_tree(world)
    total = 0
    for rs in sched.ranks:
        r = rs.rank
        sent = rs.bytes_sent(4) // 4
        degree = [len(t.children[r]) + (t.parent[r] >= 0) for t in trees]
        assert sent == sum(h * d for h, d in zip(halves, degree))
        assert sent <= 4 * -(-count // 2) <= 2 * count + 2
        total += sent
    assert total == 2 * (world - 1) * count


@pytest.mark.parametrize("count", (0, 1, 7, 1000))
def test_tree_chunks_only_change_the_rounds(count):
    # Same total traffic for every chunk count, and the pipeline really splits messages.
    for world in (2, 5, 8):
        base = sent_elements("tree", world, count)
        for chunks in (2, 5):
            fn = functools.partial(tree.all_reduce, chunks=chunks)
            sched = schedule.build("all_reduce", "tree", fn, world, count, count, count=count)
            validate(sched)
            assert [rs.bytes_sent(8) // 8 for rs in sched.ranks] == base
            biggest = max((s.src.count for rs in sched.ranks for rnd in rs.rounds for s in rnd
                           if isinstance(s, Send)), default=0)
            assert biggest == -(-(-(-count // 2)) // chunks)


def test_tree_default_chunks():
    assert tree.default_chunks(0) == 1
    assert tree.default_chunks(2 * tree.MIN_CHUNK_ELEMENTS) == 1
    assert tree.default_chunks(2 * tree.MIN_CHUNK_ELEMENTS + 2) == 2
    assert tree.default_chunks(2 * tree.PIPELINE_CHUNKS * tree.MIN_CHUNK_ELEMENTS) == tree.PIPELINE_CHUNKS
    assert tree.default_chunks(10 ** 9) == tree.PIPELINE_CHUNKS
    with pytest.raises(ValueError, match="at least one pipeline chunk"):
        tree.all_reduce(0, 4, 100, chunks=0)


# ------------------------------------------------------------- tree shape

@pytest.mark.parametrize("world", range(1, 65))
def test_double_binary_tree_shape(world):
    trees = tree.double_binary_tree(world)
    for t in trees:
        # A binary tree spanning every rank, parent and children links agreeing.
        assert [t.parent[r] for r in range(world)].count(-1) == 1 and t.parent[t.root] == -1
        for r in range(world):
            assert len(t.children[r]) <= 2
            for c in t.children[r]:
                assert t.parent[c] == r and t.depth[c] == t.depth[r] + 1
        seen, todo = set(), [t.root]
        while todo:
            r = todo.pop()
            seen.add(r)
            todo.extend(t.children[r])
        assert seen == set(range(world))
        assert t.height == lg(world)  # so the tree's latency is 2 lg p rounds
    # Every rank is interior in at most one tree: a leaf in the other.
    assert not (trees[0].interior() & trees[1].interior())
    if world % 2 == 0:
        assert all(trees[1].parent[world - 1 - r] == (-1 if p < 0 else world - 1 - p)
                   for r, p in enumerate(trees[0].parent)), "even world: the second tree is the mirror"
    else:
        assert all(trees[1].parent[(r + 1) % world] == (-1 if p < 0 else (p + 1) % world)
                   for r, p in enumerate(trees[0].parent)), "odd world: the second tree is the shift"
