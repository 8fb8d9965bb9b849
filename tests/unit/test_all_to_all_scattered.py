"""The one-round ("scattered") all-to-all: valid out of place, exact on the simulator
for random uneven split matrices with zeros, every rank's output right."""
import random

import numpy as np
import pytest

import fmcomm
from fmcomm import schedule
from fmcomm.algorithms import all_to_all
from fmcomm.dtypes import DTYPES
from fmcomm.simulator import simulate


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("trial", range(4))
def test_scattered_all_to_all(world, trial):
    rnd = random.Random(100 * world + trial)
    counts = tuple(tuple(rnd.choice([0, 1, 3, 7]) for _ in range(world)) for _ in range(world))
    rows, cols = max(sum(r) for r in counts), max(sum(c) for c in zip(*counts))
    s = schedule.build("all_to_all", "scattered", all_to_all.scattered, world, rows, cols, counts=counts)
    schedule.validate(s, output_written=False, in_place=False)
    assert len(s.ranks[0].rounds) == 1  # everything in one round
    ins = [np.arange(rows, dtype=np.int64) + 1000 * r for r in range(world)]
    outs = simulate(s, ins, DTYPES["int64"], "sum", in_place=False)
    for r in range(world):
        want = [ins[i][sum(counts[i][:r]):sum(counts[i][:r]) + counts[i][r]] for i in range(world)]
        assert np.array_equal(outs[r][:sum(c[r] for c in counts)], np.concatenate(want))


def test_scattered_is_not_valid_in_place():
    # In place the receives would land on blocks still being sent: the validator says so.
    counts = ((1, 1), (1, 1))
    s = schedule.build("all_to_all", "scattered", all_to_all.scattered, 2, 2, 2, counts=counts)
    with pytest.raises(fmcomm.ScheduleError):
        schedule.validate(s, output_written=False, in_place=True)
