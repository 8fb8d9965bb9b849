"""Schedules of reduce_scatter, all_gather, broadcast, reduce, all_to_all and barrier.

For every algorithm, world sizes 1..8 and counts 0, 1, 7, 1000 (every root where there
is one; random uneven split matrices for all_to_all): the schedule validates; the
simulator (out of place where input and output sizes differ, both ways where they do
not) gives the NumPy reference: exactly for integers and for collectives that only
move data, within the rounding bound for float reductions, and byte for byte the
reduction order each module's docstring documents; and the traffic (bytes per rank,
message rounds, the β term of the cost) is what the docstrings say.
"""
import math

import numpy as np
import pytest
import torch

from fmcomm import schedule, simulator
from fmcomm.algorithms import all_gather, all_to_all, barrier, broadcast, reduce, reduce_scatter
from fmcomm.dtypes import DTYPES
from fmcomm.errors import InvalidArgument
from fmcomm.schedule import Copy, Range, Recv, Reduce, Send, validate

WORLDS = range(1, 9)
COUNTS = (0, 1, 7, 1000)
REDUCE_OPS = ("sum", "min", "max", "prod")
REDUCE_DTYPES = ("int64", "float32", "bfloat16")
INT64 = DTYPES["int64"]
ITEMSIZE = 8

RS = {"ring": reduce_scatter.ring, "halving": reduce_scatter.halving}
AG = {"ring": all_gather.ring, "recursive_doubling": all_gather.recursive_doubling}


def lg(p: int) -> int:
    return (p - 1).bit_length()  # ceil(log2 p), 0 for p = 1


# ------------------------------------------------------------------ builders

def rs_sched(algo, world, count):
    return schedule.build("reduce_scatter", algo, RS[algo], world, world * count, count, count=count)


def ag_sched(algo, world, count):
    return schedule.build("all_gather", algo, AG[algo], world, count, world * count, count=count)


def bc_sched(algo, world, count, root, **kw):
    fn = broadcast.binomial if algo == "binomial" else broadcast.chain
    return schedule.build("broadcast", algo, fn, world, count, count, count=count, root=root, **kw)


def rd_sched(world, count, root):
    return schedule.build("reduce", "binomial", reduce.binomial, world, count, count, count=count, root=root)


def a2a_sched(counts):
    p = len(counts)
    rows = max((sum(r) for r in counts), default=0)
    cols = max((sum(counts[i][j] for i in range(p)) for j in range(p)), default=0)
    return schedule.build("all_to_all", "pairwise", all_to_all.pairwise, p, rows, cols, counts=counts)


def bar_sched(world):
    return schedule.build("barrier", "dissemination", barrier.dissemination, world, 0, 0)


# ------------------------------------------------------------------ checks shared by the tests

def writes(rs):
    """(round, Range) of every range the rank writes (receives and local steps)."""
    for ri, rnd in enumerate(rs.rounds):
        for s in rnd:
            if isinstance(s, Recv):
                yield ri, s.dst
            elif isinstance(s, (Reduce, Copy)):
                yield ri, s.dst


def ranges(rs):
    for rnd in rs.rounds:
        for s in rnd:
            if isinstance(s, Send):
                yield s.src
            elif isinstance(s, Recv):
                yield s.dst
            elif isinstance(s, Reduce):
                yield from (s.dst, s.a, s.b)
            else:
                yield from (s.dst, s.src)


def check_rank(rs, input_count, output_count, must_write_output=True):
    """Per-rank bounds (validate knows one size for all ranks) and full coverage of output."""
    sizes = {"input": input_count, "output": output_count, "scratch": rs.scratch_count}
    for r in ranges(rs):
        assert 0 <= r.offset and r.end <= sizes[r.buf], f"rank {rs.rank}: {r} outside {sizes[r.buf]}"
    if must_write_output:
        covered = np.zeros(output_count, bool)
        for _, w in writes(rs):
            if w.buf == "output":
                covered[w.offset:w.end] = True
        assert covered.all(), f"rank {rs.rank}: output element {np.flatnonzero(~covered)[0]} never written"


def message_rounds(sched):
    n = max((len(rs.rounds) for rs in sched.ranks), default=0)
    return [ri for ri in range(n) if any(isinstance(s, Send) for rs in sched.ranks
                                         if ri < len(rs.rounds) for s in rs.rounds[ri])]


def critical_elements(sched):
    """Σ over rounds of the most elements any one rank sends in it: the β term, in elements."""
    n = max((len(rs.rounds) for rs in sched.ranks), default=0)
    total = 0
    for ri in range(n):
        total += max(sum(s.src.count for s in rs.rounds[ri] if isinstance(s, Send))
                     if ri < len(rs.rounds) else 0 for rs in sched.ranks)
    return total


def sent_elements(sched):
    return [rs.bytes_sent(ITEMSIZE) // ITEMSIZE for rs in sched.ranks]


def run_with_buffers(sched, bufs, dtype, op):
    """The round semantics of fmcomm.schedule on caller-made buffers (which may alias),
    for layouts the simulator does not build (torch's in-place all_gather/reduce_scatter)."""
    n = max((len(rs.rounds) for rs in sched.ranks), default=0)
    for ri in range(n):
        steps = [(rs.rank, rs.rounds[ri] if ri < len(rs.rounds) else ()) for rs in sched.ranks]
        view = lambda r, g: bufs[r][g.buf][g.offset:g.end]  # noqa: E731
        wire = {}
        for r, rnd in steps:
            for s in rnd:
                if isinstance(s, Send):
                    wire.setdefault((r, s.peer), []).append(view(r, s.src).copy())
        for r, rnd in steps:
            for s in rnd:
                if isinstance(s, Recv):
                    view(r, s.dst)[:] = wire[(s.peer, r)].pop(0)
        assert not any(wire.values()), "a message nobody received"
        for r, rnd in steps:
            for s in rnd:
                if isinstance(s, Reduce):
                    view(r, s.dst)[:] = simulator.combine(view(r, s.a), view(r, s.b), dtype, op)
                elif isinstance(s, Copy):
                    view(r, s.dst)[:] = view(r, s.src).copy()


# ------------------------------------------------------------------ values and references

def to_storage(values, dtype):
    if dtype.name == "bfloat16":
        return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return values.astype(dtype.numpy)


def to_float64(stored, dtype):
    if dtype.name == "bfloat16":
        return torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16).double().numpy()
    return stored.astype(np.float64)


def make_inputs(rng, dtype, op, world, n):
    if not dtype.is_float:
        info = np.iinfo(dtype.numpy)
        return [rng.integers(info.min, info.max, size=n, endpoint=True, dtype=dtype.numpy) for _ in range(world)]
    if op == "prod":
        # (8+k)/8 * 2^e * sign: 4 significant bits, |x| in [1/2, 2): the float64 product of
        # up to 8 is exact and nothing overflows or underflows in any dtype.
        vals = (rng.integers(8, 16, size=(world, n)) / 8.0 * np.exp2(rng.integers(-1, 1, size=(world, n)))
                * rng.choice([-1.0, 1.0], (world, n)))
    else:
        vals = rng.uniform(-1, 1, size=(world, n)) * np.exp2(rng.integers(-6, 7, size=(world, n)))
    return [to_storage(v, dtype) for v in vals]


def wrap64(v: int) -> int:
    return (v + (1 << 63)) % (1 << 64) - (1 << 63)


def gamma(k, u):
    return k * u / (1 - k * u)


def check_reduction(got, contributions, dtype, op):
    """``got`` (storage) against the reduction of ``contributions`` (one storage array per rank)."""
    p = len(contributions)
    if not dtype.is_float:
        cols = zip(*[[int(v) for v in x] for x in contributions])
        f = {"sum": lambda c: wrap64(sum(c)), "prod": lambda c: wrap64(math.prod(c)), "min": min, "max": max}[op]
        np.testing.assert_array_equal(got, np.array([f(c) for c in cols], dtype=np.int64))
        return
    xs = np.stack([to_float64(x, dtype) for x in contributions])
    u = dtype.unit_roundoff
    if op in ("min", "max"):
        ref, tol = (xs.min(0) if op == "min" else xs.max(0)), 0.0
    elif op == "prod":
        ref = xs.prod(0)
        tol = gamma(p - 1, u) * np.abs(ref)
    else:
        ref = np.array([math.fsum(c) for c in xs.T])
        tol = gamma(p - 1, u) * np.abs(xs).sum(0) + 2 * u * np.abs(ref)
    g = to_float64(got, dtype)
    assert np.isfinite(g).all()
    bad = np.flatnonzero(np.abs(g - ref) > tol)
    assert bad.size == 0, (f"{bad.size} elements outside the rounding bound, first {bad[0]}: "
                           f"{g[bad[0]]} vs {ref[bad[0]]}")


def comb(dtype, op):
    return lambda a, b: simulator.combine(a, b, dtype, op)


def rs_ring_order(blocks, b, f):
    """reduce_scatter.ring docstring: out_b = x_b ⊕ (x_{b−1} ⊕ (… ⊕ (x_{b+2} ⊕ x_{b+1})))."""
    p = len(blocks)
    acc = blocks[(b + 1) % p]
    for k in range(2, p + 1):
        acc = f(blocks[(b + k) % p], acc)
    return acc


def rs_halving_order(blocks, j, f):
    """reduce_scatter.halving docstring: T_j(v, l) = T_j(v, l+1) ⊕ T_j(v XOR 2^l, l+1)."""
    p = len(blocks)
    m = p.bit_length() - 1
    P, e = 1 << m, p - (1 << m)

    def T(v, lev):
        if lev == m:
            return f(blocks[v], blocks[P + v]) if v < e else blocks[v]
        return f(T(v, lev + 1), T(v ^ (1 << lev), lev + 1))
    return T(j if j < P else j - P, 0)


def reduce_order(xs, root, f):
    """reduce.binomial docstring: T_v = (…((x_v ⊕ T_{v+1}) ⊕ T_{v+2}) ⊕ …), relative ranks."""
    p = len(xs)

    def T(v):
        acc = xs[(v + root) % p]
        low = v & -v if v else 1 << p.bit_length()
        mask = 1
        while mask < p and mask < low:
            if v + mask < p:
                acc = f(acc, T(v + mask))
            mask <<= 1
        return acc
    return T(0)


# ================================================================== reduce_scatter

@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("algo", list(RS))
def test_reduce_scatter(algo, world, count):
    sched = rs_sched(algo, world, count)
    validate(sched)
    for rs in sched.ranks:
        check_rank(rs, world * count, count)
    order = rs_ring_order if algo == "ring" else rs_halving_order
    for dname in REDUCE_DTYPES:
        dtype = DTYPES[dname]
        for op in REDUCE_OPS:
            rng = np.random.default_rng([world, count, dtype.code, ord(op[0]), ord(op[1])])
            inputs = make_inputs(rng, dtype, op, world, world * count)
            before = [x.copy() for x in inputs]
            outs = simulator.simulate(sched, inputs, dtype, op, in_place=False)
            for x, bx in zip(inputs, before):
                assert x.tobytes() == bx.tobytes()
            for r, o in enumerate(outs):
                assert o.shape == (count,)
                blocks = [x[r * count:(r + 1) * count] for x in inputs]
                check_reduction(o, blocks, dtype, op)
                expect = order(blocks, r, comb(dtype, op))
                assert o.tobytes() == expect.tobytes(), f"rank {r}: not the documented reduction order"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("algo", list(RS))
def test_reduce_scatter_every_rank_contributes_once(algo, world):
    # Rank r's element i (of p·count) is 16^r + i·2^32: the low 32 bits of a sum count each
    # rank's contributions in one hex digit, the high bits say which element it was.
    count = 37
    i = np.arange(world * count, dtype=np.int64)
    inputs = [np.int64(16) ** r + (i << 32) for r in range(world)]
    outs = simulator.simulate(rs_sched(algo, world, count), inputs, INT64, "sum", in_place=False)
    for rank, o in enumerate(outs):
        low, high = o & 0xFFFFFFFF, o >> 32
        for r in range(world):
            assert ((low >> (4 * r)) & 0xF == 1).all(), f"rank {rank}: rank {r} not added exactly once"
        assert (low >> (4 * world) == 0).all()
        np.testing.assert_array_equal(high, world * (rank * count + np.arange(count)))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("algo", list(RS))
def test_reduce_scatter_in_torch_in_place_layout(algo, world):
    # torch's in-place reduce_scatter_tensor: output is input block r itself.
    count = 7
    rng = np.random.default_rng(world)
    xs = [rng.integers(-1000, 1000, world * count) for _ in range(world)]
    sched = rs_sched(algo, world, count)
    mem = [x.copy() for x in xs]
    bufs = [{"input": mem[r], "output": mem[r][r * count:(r + 1) * count],
             "scratch": np.zeros(rs.scratch_count, np.int64)} for r, rs in enumerate(sched.ranks)]
    run_with_buffers(sched, bufs, INT64, "sum")
    total = np.sum(xs, axis=0)
    for r in range(world):
        np.testing.assert_array_equal(bufs[r]["output"], total[r * count:(r + 1) * count])


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("algo", list(RS))
def test_reduce_scatter_traffic(algo, world, count):
    sched = rs_sched(algo, world, count)
    p = world
    m = p.bit_length() - 1
    P, e = 1 << m, p - (1 << m)
    if algo == "ring" or e == 0:
        expect = [(p - 1) * count] * p
        beta, alpha = (p - 1) * count, (p - 1 if algo == "ring" else m)
    else:
        expect = [(p - 1) * count if r < P else p * count for r in range(p)]
        h = (P - 1 + sum(min(d, e) for d in (1 << k for k in range(m)))) * count
        beta, alpha = p * count + h + count, m + 2
    assert sent_elements(sched) == expect
    assert critical_elements(sched) == beta
    if count:
        assert len(message_rounds(sched)) == alpha


def tie_inputs(rng, dtype, world, n):
    """Only +0, -0 and NaNs of two payloads: min/max then pick by position, so the bytes
    show the operand order (a ⊕ b keeps a on a tie or a NaN a; swapping a and b shows)."""
    if dtype.name == "bfloat16":
        pool = np.array([0x0000, 0x8000, 0x7FC1, 0x7FC2], np.uint16)
    else:
        pool = np.array([0x00000000, 0x80000000, 0x7FC00001, 0x7FC00002], np.uint32).view(np.float32)
    return [rng.choice(pool, n) for _ in range(world)]


@pytest.mark.parametrize("dname", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", ["min", "max"])
@pytest.mark.parametrize("world", WORLDS)
def test_documented_order_on_ties(world, op, dname):
    dtype = DTYPES[dname]
    rng = np.random.default_rng([world, ord(op[1]), dtype.code])
    f = comb(dtype, op)
    count = 40
    for algo, order in (("ring", rs_ring_order), ("halving", rs_halving_order)):
        inputs = tie_inputs(rng, dtype, world, world * count)
        outs = simulator.simulate(rs_sched(algo, world, count), inputs, dtype, op, in_place=False)
        for r, o in enumerate(outs):
            blocks = [x[r * count:(r + 1) * count] for x in inputs]
            assert o.tobytes() == order(blocks, r, f).tobytes(), f"{algo} rank {r}"
    for root in range(world):
        inputs = tie_inputs(rng, dtype, world, count)
        out = simulator.simulate(rd_sched(world, count, root), inputs, dtype, op, in_place=False)[root]
        assert out.tobytes() == reduce_order(inputs, root, f).tobytes(), f"reduce root {root}"


# ================================================================== all_gather

@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("algo", list(AG))
def test_all_gather(algo, world, count):
    sched = ag_sched(algo, world, count)
    validate(sched)
    for rs in sched.ranks:
        check_rank(rs, count, world * count)
    rng = np.random.default_rng([world, count])
    for dname in ("int64", "float32", "bfloat16"):
        dtype = DTYPES[dname]
        inputs = make_inputs(rng, dtype, "sum", world, count)
        before = [x.copy() for x in inputs]
        outs = simulator.simulate(sched, inputs, dtype, "sum", in_place=False)
        expect = np.concatenate(inputs) if count else np.zeros(0, inputs[0].dtype)
        for x, bx in zip(inputs, before):
            assert x.tobytes() == bx.tobytes()
        for o in outs:
            assert o.tobytes() == expect.tobytes()


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("algo", list(AG))
def test_all_gather_in_torch_in_place_layout(algo, world):
    # torch's in-place all_gather_into_tensor: input is output block r itself.
    count = 7
    sched = ag_sched(algo, world, count)
    xs = [np.arange(count, dtype=np.int64) + 100 * r for r in range(world)]
    mem = [np.full(world * count, -1, np.int64) for _ in range(world)]
    for r in range(world):
        mem[r][r * count:(r + 1) * count] = xs[r]
    bufs = [{"input": mem[r][r * count:(r + 1) * count], "output": mem[r],
             "scratch": np.zeros(rs.scratch_count, np.int64)} for r, rs in enumerate(sched.ranks)]
    run_with_buffers(sched, bufs, INT64, "sum")
    for r in range(world):
        np.testing.assert_array_equal(mem[r], np.concatenate(xs))


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("algo", list(AG))
def test_all_gather_traffic(algo, world, count):
    sched = ag_sched(algo, world, count)
    assert sent_elements(sched) == [(world - 1) * count] * world
    assert critical_elements(sched) == (world - 1) * count
    if count:
        assert len(message_rounds(sched)) == (world - 1 if algo == "ring" else lg(world))


# ================================================================== broadcast

BC_VARIANTS = [("binomial", {}), ("chain", {}), ("chain", {"chunks": 1}), ("chain", {"chunks": 3}),
               ("chain", {"chunks": 64})]


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("algo, kw", BC_VARIANTS, ids=[f"{a}{kw}" for a, kw in BC_VARIANTS])
def test_broadcast(algo, kw, world, count):
    rng = np.random.default_rng([world, count])
    for root in range(world):
        sched = bc_sched(algo, world, count, root, **kw)
        validate(sched)
        for rs in sched.ranks:
            check_rank(rs, count, count)
        for dname in ("int64", "float32"):
            dtype = DTYPES[dname]
            inputs = make_inputs(rng, dtype, "sum", world, count)
            expect = inputs[root].tobytes()
            for in_place in (True, False):
                given = [x.copy() for x in inputs]
                outs = simulator.simulate(sched, given, dtype, "sum", in_place=in_place)
                for r, o in enumerate(outs):
                    assert o.tobytes() == expect, f"rank {r} (root {root}, in_place={in_place})"


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
def test_broadcast_traffic(world, count):
    for root in range(world):
        sched = bc_sched("binomial", world, count, root)
        rel = [(r - root) % world for r in range(world)]
        assert sent_elements(sched) == [count * sum(1 for k in range(lg(world)) if v < 2 ** k < world - v)
                                        for v in rel]
        assert critical_elements(sched) == lg(world) * count
        if count:
            assert len(message_rounds(sched)) == lg(world)
        for chunks in (None, 1, 4, 10, 64):
            sched = bc_sched("chain", world, count, root, chunks=chunks)
            c = max(1, min(count, chunks or broadcast.default_chunks(world, count)))
            assert sent_elements(sched) == [count if v < world - 1 else 0 for v in rel]
            if world > 1 and count:
                assert len(message_rounds(sched)) == c + world - 2
                assert len(sched.ranks[0].rounds) == 1 + c + world - 2
                assert critical_elements(sched) <= (c + world - 2) * math.ceil(count / c)
                if count % c == 0:
                    assert critical_elements(sched) == (c + world - 2) * count // c


def test_chain_default_chunks():
    assert broadcast.default_chunks(2, 10 ** 9) == 1  # no pipelining gain on two ranks
    assert broadcast.default_chunks(8, 1000) == 1
    assert broadcast.default_chunks(8, 0) == 1
    # sqrt(6 * 2^24 / 2^16) = sqrt(1536) = 39.2
    assert broadcast.default_chunks(8, 1 << 24) == 39
    assert broadcast.default_chunks(3, 1 << 16) == 1
    assert broadcast.default_chunks(3, 9 << 16) == 3


# ================================================================== reduce

@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
def test_reduce(world, count):
    for root in range(world):
        sched = rd_sched(world, count, root)
        validate(sched, output_written=False)
        for rs in sched.ranks:
            check_rank(rs, count, count, must_write_output=rs.rank == root)
            if rs.rank != root:
                assert not any(w.buf == "output" for _, w in writes(rs)), f"rank {rs.rank} writes its output"
        for dname in REDUCE_DTYPES:
            dtype = DTYPES[dname]
            for op in REDUCE_OPS:
                rng = np.random.default_rng([world, count, root, dtype.code, ord(op[1])])
                inputs = make_inputs(rng, dtype, op, world, count)
                expect = reduce_order(inputs, root, comb(dtype, op)).tobytes()
                for in_place in (True, False):
                    given = [x.copy() for x in inputs]
                    outs = simulator.simulate(sched, given, dtype, op, in_place=in_place)
                    check_reduction(outs[root], inputs, dtype, op)
                    assert outs[root].tobytes() == expect, "not the documented reduction order"
                    for r, o in enumerate(outs):
                        if r != root:
                            untouched = inputs[r] if in_place else np.zeros_like(inputs[r])
                            assert o.tobytes() == untouched.tobytes(), f"rank {r}'s output was modified"
                    if not in_place:
                        for x, g in zip(inputs, given):
                            assert x.tobytes() == g.tobytes()


@pytest.mark.parametrize("world", WORLDS)
def test_reduce_every_rank_contributes_once(world):
    count = 37
    i = np.arange(count, dtype=np.int64)
    inputs = [np.int64(16) ** r + (i << 32) for r in range(world)]
    for root in range(world):
        out = simulator.simulate(rd_sched(world, count, root), [x.copy() for x in inputs], INT64, "sum")[root]
        low, high = out & 0xFFFFFFFF, out >> 32
        for r in range(world):
            assert ((low >> (4 * r)) & 0xF == 1).all()
        np.testing.assert_array_equal(high, world * i)


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
def test_reduce_traffic(world, count):
    for root in range(world):
        sched = rd_sched(world, count, root)
        assert sent_elements(sched) == [0 if r == root else count for r in range(world)]
        assert critical_elements(sched) == lg(world) * count
        if count:
            assert len(message_rounds(sched)) == lg(world)


# ================================================================== all_to_all

def split_matrices(world):
    rng = np.random.default_rng(world)
    mats = [np.full((world, world), c) for c in COUNTS]  # even splits
    mats.append(np.diag(np.arange(1, world + 1)))  # only own blocks
    for hi in (3, 6, 40):
        for _ in range(3):
            mats.append(rng.integers(0, hi, (world, world)) * (rng.random((world, world)) > 0.3))
    return [tuple(tuple(int(v) for v in row) for row in m) for m in mats]


@pytest.mark.parametrize("world", WORLDS)
def test_all_to_all(world):
    for counts in split_matrices(world):
        p = world
        sched = a2a_sched(counts)
        validate(sched, output_written=False)
        rows = [sum(counts[r]) for r in range(p)]
        cols = [sum(counts[i][r] for i in range(p)) for r in range(p)]
        for rs in sched.ranks:
            check_rank(rs, rows[rs.rank], cols[rs.rank])
        # Element k of rank i's input: i·10^6 + k; past its real end, a sentinel.
        inputs = [np.full(sched.input_count, -7, np.int64) for _ in range(p)]
        for i in range(p):
            inputs[i][:rows[i]] = i * 10 ** 6 + np.arange(rows[i])
        outs = simulator.simulate(sched, inputs, INT64, "sum", in_place=False)
        for r in range(p):
            parts = []
            for i in range(p):
                start = sum(counts[i][:r])
                parts.append(inputs[i][start:start + counts[i][r]])
            np.testing.assert_array_equal(outs[r][:cols[r]], np.concatenate(parts))
            assert (outs[r][cols[r]:] == 0).all(), "written past this rank's output"
        assert sent_elements(sched) == [rows[r] - counts[r][r] for r in range(p)]
        assert critical_elements(sched) == sum(max(counts[r][(r + k) % p] for r in range(p)) for k in range(1, p))
        assert len(message_rounds(sched)) == sum(1 for k in range(1, p)
                                                 if any(counts[r][(r + k) % p] for r in range(p)))
        for rs in sched.ranks:
            for k, rnd in enumerate(rs.rounds[1:world], start=1):
                for s in rnd:
                    if isinstance(s, Send):
                        assert s.peer == (rs.rank + k) % p
                    elif isinstance(s, Recv):
                        assert s.peer == (rs.rank - k) % p


def test_all_to_all_float_bits_and_staging():
    # An even split on an even world stages round p/2 (see the module docstring); the
    # bits of floats (NaN payloads, -0.0) must come through any path unchanged.
    p, c = 4, 5
    counts = tuple(tuple([c] * p) for _ in range(p))
    sched = a2a_sched(counts)
    assert all(rs.scratch_count == c for rs in sched.ranks)
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 2 ** 32, p * c, dtype=np.uint64).astype(np.uint32).view(np.float32) for _ in range(p)]
    outs = simulator.simulate(sched, inputs, DTYPES["float32"], "sum", in_place=False)
    for r in range(p):
        expect = np.concatenate([inputs[i][r * c:(r + 1) * c] for i in range(p)])
        assert outs[r].tobytes() == expect.tobytes()


def test_all_to_all_rejects_bad_counts():
    with pytest.raises(InvalidArgument):
        all_to_all.pairwise(0, 2, ((1, 2),))
    with pytest.raises(InvalidArgument):
        all_to_all.pairwise(0, 2, ((1, 2), (3, -1)))
    with pytest.raises(InvalidArgument):
        all_to_all.pairwise(0, 2, ((1, 2), (3, 1.5)))


# ================================================================== barrier

@pytest.mark.parametrize("world", WORLDS)
def test_barrier(world):
    sched = bar_sched(world)
    validate(sched)
    outs = simulator.simulate(sched, [np.zeros(0, np.int32)] * world, DTYPES["int32"], "sum")
    assert [o.shape for o in outs] == [(0,)] * world
    assert all(len(rs.rounds) == lg(world) for rs in sched.ranks)
    assert sent_elements(sched) == [lg(world)] * world
    assert all(rs.scratch_count == (2 if world > 1 else 0) for rs in sched.ranks)
    # Who has (transitively) heard from whom: a rank may leave only once it has heard from all.
    heard = [{r} for r in range(world)]
    for ri in range(lg(world)):
        start = [set(h) for h in heard]
        for rs in sched.ranks:
            for s in rs.rounds[ri]:
                if isinstance(s, Recv):
                    assert s.peer == (rs.rank - 2 ** ri) % world
                    heard[rs.rank] |= start[s.peer]
                elif isinstance(s, Send):
                    assert s.peer == (rs.rank + 2 ** ri) % world and s.src == Range("scratch", 0, 1)
    assert all(h == set(range(world)) for h in heard)


# ================================================================== arguments, count < world

def test_bad_roots_and_chunks_are_refused():
    for fn in (broadcast.binomial, broadcast.chain, reduce.binomial):
        with pytest.raises(InvalidArgument):
            fn(0, 4, 10, 4)
        with pytest.raises(InvalidArgument):
            fn(0, 4, 10, -1)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(InvalidArgument):
            broadcast.chain(0, 4, 10, 0, chunks=bad)


def test_world_one_schedules_are_one_local_copy():
    for sched in (rs_sched("ring", 1, 5), rs_sched("halving", 1, 5), ag_sched("ring", 1, 5),
                  ag_sched("recursive_doubling", 1, 5), bc_sched("binomial", 1, 5, 0), bc_sched("chain", 1, 5, 0),
                  rd_sched(1, 5, 0)):
        (rs,) = sched.ranks
        assert [s for rnd in rs.rounds for s in rnd] == [Copy(Range("output", 0, 5), Range("input", 0, 5))]
