"""Hierarchical all-reduce and all-gather on node layouts with equal, unequal and
interleaved nodes: valid schedules, exact int64 results on the simulator, identical
bytes on every rank for float16 (where reduction order shows), and the bytes that
leave each node equal to the formulas in the modules' docstrings."""
import numpy as np
import pytest

from fmcomm import schedule
from fmcomm.algorithms import all_gather, hierarchical, ring
from fmcomm.dtypes import DTYPES
from fmcomm.runtime.executor import compile_rounds
from fmcomm.simulator import simulate

LAYOUTS = [(0,), (0, 0), (0, 1), (0, 0, 1, 1), (0, 0, 0, 1, 1), (0, 1, 1, 1), (0, 0, 1, 1, 2, 2), (0, 1, 0, 1),
           (0, 0, 0, 0, 1, 1, 1, 1), (0, 1, 2), (0, 0, 0, 1, 2, 2)]


def build_ar(node_of, count):
    return schedule.build("all_reduce", "hierarchical", hierarchical.all_reduce, len(node_of), count, count,
                          count=count, node_of=node_of)


def build_ag(node_of, count):
    w = len(node_of)
    return schedule.build("all_gather", "hierarchical", all_gather.hierarchical, w, count, w * count,
                          count=count, node_of=node_of)


def off_node_bytes(sched, node_of, itemsize):
    per = {}
    for r, rs in enumerate(sched.ranks):
        per[node_of[r]] = per.get(node_of[r], 0) + compile_rounds(rs, itemsize, 1 << 20, node_of).inter_node_bytes
    return per


@pytest.mark.parametrize("node_of", LAYOUTS)
@pytest.mark.parametrize("count", [0, 1, 7, 1001])
def test_all_reduce_exact_and_identical(node_of, count):
    s = build_ar(node_of, count)
    schedule.validate(s)
    w = len(node_of)
    # 16^r + i·2^32: each element's sum says how often each rank contributed (exactly once here).
    ins = [16 ** r + np.arange(count, dtype=np.int64) * 2 ** 32 for r in range(w)]
    for in_place in (True, False):
        outs = simulate(s, [x.copy() for x in ins], DTYPES["int64"], "sum", in_place=in_place)
        assert all(np.array_equal(o, sum(ins)) for o in outs)
    halves = [np.random.RandomState(r).rand(count).astype(np.float16) for r in range(w)]
    outs = simulate(s, halves, DTYPES["float16"], "sum")
    assert len({o.tobytes() for o in outs}) == 1


@pytest.mark.parametrize("node_of", LAYOUTS)
@pytest.mark.parametrize("count", [0, 1, 7, 100])
def test_all_gather_exact(node_of, count):
    s = build_ag(node_of, count)
    schedule.validate(s)
    ins = [np.arange(count, dtype=np.int64) + 1000 * r for r in range(len(node_of))]
    outs = simulate(s, ins, DTYPES["int64"], "sum", in_place=False)
    assert all(np.array_equal(o, np.concatenate(ins)) for o in outs)


@pytest.mark.parametrize("node_of", [(0, 0, 1, 1), (0, 0, 0, 1, 1, 1), (0, 0, 1, 1, 2, 2)])
def test_off_node_bytes_match_the_formulas(node_of):
    n_nodes = len(set(node_of))
    world = len(node_of)
    count = 6 * 10 * 7  # divisible by every chunking used here: the formulas hold exactly
    S = count * 4
    per = off_node_bytes(build_ar(node_of, count), node_of, 4)
    assert all(v == S * 2 * (n_nodes - 1) // n_nodes for v in per.values())
    flat = off_node_bytes(schedule.build("all_reduce", "ring", ring.all_reduce, world, count, count, count=count),
                          node_of, 4)
    assert all(flat[n] > per[n] for n in per)
    per_ag = off_node_bytes(build_ag(node_of, count), node_of, 4)
    local = world // n_nodes
    assert all(v == (n_nodes - 1) * local * count * 4 for v in per_ag.values())
