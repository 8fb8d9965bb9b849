"""fmcomm.schedule: the ring all-reduce schedule is well formed, and the validator rejects bad schedules."""
import math

import pytest

import fmcomm
from fmcomm import schedule
from fmcomm.algorithms import REGISTRY
from fmcomm.schedule import Copy, Range, RankSchedule, Recv, Reduce, Schedule, Send, chunk_bounds, validate

WORLDS = range(1, 9)
COUNTS = (0, 1, 2, 7, 8, 9, 1000, 1_000_003)


def ring(world: int, count: int) -> Schedule:
    fn = REGISTRY[("all_reduce", "ring")]
    return schedule.build("all_reduce", "ring", fn, world, count, count, count=count)


# ------------------------------------------------------------ ring all-reduce

@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
def test_ring_schedule_validates(world, count):
    validate(ring(world, count))


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
def test_ring_round_count(world, count):
    sched = ring(world, count)
    rounds = {len(rs.rounds) for rs in sched.ranks}
    assert len(rounds) == 1, "ranks disagree on the number of rounds"
    if world > 1:
        assert rounds == {2 * (world - 1)}
    else:
        assert rounds == {1 if count else 0}  # one local copy, nothing at all when empty


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("world", WORLDS)
def test_ring_bytes_sent_per_rank(world, count):
    sched = ring(world, count)
    itemsize = 4
    ideal = 2 * (world - 1) / world * count  # elements
    per_rank = [rs.bytes_sent(itemsize) / itemsize for rs in sched.ranks]
    for sent in per_rank:
        assert sent == int(sent)
        # Each rank sends 2(world-1) chunks, each of floor or ceil(count/world) elements.
        assert 2 * (world - 1) * (count // world) <= sent <= 2 * (world - 1) * math.ceil(count / world)
        # Rank r skips chunk r+1 in the reduce-scatter and chunk r+2 in the all-gather, so
        # it sends 2*count minus two chunks: less than two elements from the ideal.
        assert abs(sent - ideal) < 2
    # Over all ranks every chunk is skipped exactly twice: exactly 2(world-1) buffers in total.
    assert sum(per_rank) == 2 * (world - 1) * count


@pytest.mark.parametrize("world", WORLDS)
def test_ring_peers_are_neighbours(world):
    for rs in ring(world, 100).ranks:
        to, frm = rs.peers()
        if world == 1:
            assert (to, frm) == (set(), set())
        else:
            assert to == {(rs.rank + 1) % world} and frm == {(rs.rank - 1) % world}


def test_ring_world_one_is_a_single_copy():
    (rs,) = ring(1, 5).ranks
    assert rs.rounds == ((Copy(Range("output", 0, 5), Range("input", 0, 5)),),)


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("parts", WORLDS)
def test_chunk_bounds_cover_contiguously(count, parts):
    chunks = chunk_bounds(count, parts)
    assert len(chunks) == parts
    off = 0
    for o, n in chunks:
        assert o == off and n >= 0
        off += n
    assert off == count
    sizes = [n for _, n in chunks]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger chunks come first


# -------------------------------------------------------- validator, by hand

def sched(world, rank_rounds, *, count=4, scratch=0, output_count=None):
    """A Schedule from each rank's list of rounds (lists of steps)."""
    ranks = tuple(RankSchedule(r, tuple(tuple(rnd) for rnd in rounds), scratch)
                  for r, rounds in enumerate(rank_rounds))
    return Schedule("all_reduce", "handmade", world, count, count if output_count is None else output_count, ranks)


def out(offset, count):
    return Range("output", offset, count)


def inp(offset, count):
    return Range("input", offset, count)


def swap_halves():
    """A correct 2-rank schedule: each rank sends one half and receives the other, then
    copies its own half (in a later round: in place, that copy's destination is the
    memory being sent)."""
    return sched(2, [
        [[Send(1, inp(0, 2)), Recv(1, out(2, 2))], [Copy(out(0, 2), inp(0, 2))]],
        [[Send(0, inp(2, 2)), Recv(0, out(0, 2))], [Copy(out(2, 2), inp(2, 2))]],
    ])


def test_handmade_reference_schedule_is_valid():
    # The negative tests below are mutations of this one; it must pass as it stands.
    validate(swap_halves())


def test_empty_world_one_schedule_is_valid():
    # At world 1 the output need not be written by the schedule.
    validate(sched(1, [[]]))


def test_send_without_receive():
    s = sched(2, [[[Send(1, inp(0, 2))]], [[]]])
    with pytest.raises(fmcomm.ScheduleError, match=r"rank 0 sends \[2\] elements to rank 1, which receives \[\]"):
        validate(s, output_written=False)


def test_receive_without_send():
    s = sched(2, [[[]], [[Recv(0, out(0, 2))]]])
    with pytest.raises(fmcomm.ScheduleError, match=r"rank 0 sends \[\] elements to rank 1, which receives \[2\]"):
        validate(s, output_written=False)


def test_receive_size_differs_from_send_size():
    s = sched(2, [[[Send(1, inp(0, 2))]], [[Recv(0, out(0, 3))]]])
    with pytest.raises(fmcomm.ScheduleError, match=r"sends \[2\] elements to rank 1, which receives \[3\]"):
        validate(s, output_written=False)


def test_messages_matched_in_posting_order():
    # Same total, same multiset, wrong order: 1 then 2 sent, 2 then 1 received.
    s = sched(2, [[[Send(1, inp(0, 1)), Send(1, inp(1, 2))]],
                  [[Recv(0, out(0, 2)), Recv(0, out(2, 1))]]])
    with pytest.raises(fmcomm.ScheduleError, match=r"sends \[1, 2\].*receives \[2, 1\]"):
        validate(s, output_written=False)


def test_send_and_receive_in_different_rounds():
    s = sched(2, [[[Send(1, inp(0, 2))], []],
                  [[], [Recv(0, out(0, 2))]]])
    with pytest.raises(fmcomm.ScheduleError, match="round 0"):
        validate(s, output_written=False)


@pytest.mark.parametrize("bad", [
    Range("output", 3, 2),    # runs past the end
    Range("output", -1, 2),   # negative offset
    Range("output", 0, -1),   # negative count
    Range("input", 4, 1),     # starts at the end
    Range("scratch", 0, 1),   # this rank has no scratch
    Range("inbox", 0, 1),     # no such buffer
])
def test_range_out_of_bounds(bad):
    s = sched(2, [[[Send(1, bad)]], [[Recv(0, Range("output", 0, bad.count))]]])
    with pytest.raises(fmcomm.ScheduleError, match="outside its buffer|unknown buffer"):
        validate(s, output_written=False)


def test_scratch_range_within_scratch_count_is_fine():
    s = sched(2, [[[Send(1, inp(0, 2)), Recv(1, Range("scratch", 0, 2))]],
                  [[Send(0, inp(0, 2)), Recv(0, Range("scratch", 0, 2))]]], scratch=2)
    validate(s, output_written=False)


@pytest.mark.parametrize("step", [
    Copy(inp(0, 2), out(0, 2)),
    Reduce(inp(0, 2), inp(0, 2), out(2, 2)),
], ids=["copy", "reduce"])
def test_local_step_writing_the_input(step):
    s = sched(1, [[[step]]])
    with pytest.raises(fmcomm.ScheduleError, match="writes the input buffer"):
        validate(s)


def test_receive_into_the_input():
    s = sched(2, [[[Send(1, out(0, 2))]], [[Recv(0, inp(2, 2))]]])
    with pytest.raises(fmcomm.ScheduleError, match="writes the input buffer"):
        validate(s, output_written=False)


def test_output_element_never_written_at_world_two():
    s = swap_halves()
    # Rank 1 forgets to copy its own half: output[2:4] stays unwritten on rank 1.
    r1 = RankSchedule(1, ((Send(0, inp(2, 2)), Recv(0, out(0, 2))), ()))
    s = Schedule(s.collective, s.algo, 2, 4, 4, (s.ranks[0], r1))
    with pytest.raises(fmcomm.ScheduleError, match="rank 1: output element 2 is never written"):
        validate(s)
    validate(s, output_written=False)  # the only defect


def test_output_gap_in_the_middle():
    # Rank 0 gets element 0 from rank 1 and copies 2..3 itself; element 1 is left out.
    s = sched(2, [[[Send(1, inp(1, 1)), Recv(1, out(0, 1)), Copy(out(2, 2), inp(2, 2))], []],
                  [[Send(0, inp(0, 1)), Recv(0, out(1, 1)), Copy(out(2, 2), inp(2, 2))],
                   [Copy(out(0, 1), inp(0, 1))]]])
    with pytest.raises(fmcomm.ScheduleError, match="rank 0: output element 1 is never written"):
        validate(s)


def test_receive_landing_on_a_range_being_sent():
    s = sched(2, [[[Send(1, out(0, 2)), Recv(1, out(1, 2))]],
                  [[Send(0, out(0, 2)), Recv(0, out(2, 2))]]])
    with pytest.raises(fmcomm.ScheduleError, match="rank 0 round 0: a receive lands on a range being sent"):
        validate(s, output_written=False)


def test_receive_into_output_while_sending_the_same_input_range():
    # In place, input and output are one memory, so this is the same race.
    s = sched(2, [[[Send(1, inp(0, 2)), Recv(1, out(0, 2))]],
                  [[Send(0, inp(2, 2)), Recv(0, out(2, 2))]]])
    with pytest.raises(fmcomm.ScheduleError, match="a receive lands on a range being sent"):
        validate(s, output_written=False)


def test_two_receives_on_one_range():
    s = sched(3, [[[Recv(1, out(0, 2)), Recv(2, out(1, 2))]],
                  [[Send(0, inp(0, 2))]],
                  [[Send(0, inp(0, 2))]]])
    with pytest.raises(fmcomm.ScheduleError, match="two receives land on one range"):
        validate(s, output_written=False)


def test_local_step_writing_a_range_being_sent():
    s = sched(2, [[[Send(1, out(0, 2)), Recv(1, out(2, 2)), Copy(out(1, 1), out(3, 1))]],
                  [[Send(0, inp(0, 2)), Recv(0, out(0, 2))]]])
    with pytest.raises(fmcomm.ScheduleError, match="a local step writes a range being sent"):
        validate(s, output_written=False)


def test_reduce_source_partly_overlapping_its_destination():
    s = sched(1, [[[Reduce(out(0, 2), out(1, 2), out(2, 2))]]])
    with pytest.raises(fmcomm.ScheduleError, match="partly overlaps"):
        validate(s)


def test_reduce_into_one_of_its_own_operands_is_fine():
    validate(sched(1, [[[Reduce(out(0, 2), out(0, 2), out(2, 2))]]]))


def test_reduce_operands_of_different_length():
    s = sched(1, [[[Reduce(out(0, 2), out(0, 2), out(2, 1))]]])
    with pytest.raises(fmcomm.ScheduleError, match="operands differ in length"):
        validate(s)


@pytest.mark.parametrize("step", [Send(2, inp(0, 1)), Send(-1, inp(0, 1)), Send(0, inp(0, 1)),
                                  Recv(2, out(0, 1)), Recv(-1, out(0, 1)), Recv(0, out(0, 1))],
                         ids=["send-past-world", "send-negative", "send-self",
                              "recv-past-world", "recv-negative", "recv-self"])
def test_invalid_peer(step):
    s = sched(2, [[[step]], [[]]])
    with pytest.raises(fmcomm.ScheduleError, match="invalid peer"):
        validate(s, output_written=False)


def test_ranks_out_of_order():
    s = swap_halves()
    with pytest.raises(fmcomm.ScheduleError, match="ranks 0..1 in order"):
        validate(Schedule(s.collective, s.algo, 2, 4, 4, (s.ranks[1], s.ranks[0])))


def test_missing_rank():
    s = swap_halves()
    with pytest.raises(fmcomm.ScheduleError, match="ranks 0..1 in order"):
        validate(Schedule(s.collective, s.algo, 2, 4, 4, s.ranks[:1]))


def test_unknown_step():
    s = sched(1, [[["not a step"]]])
    with pytest.raises(fmcomm.ScheduleError, match="unknown step"):
        validate(s)


def test_local_step_writing_a_range_being_received():
    # Rank 0 receives into output[0:2] and, in the same round, copies into output[1:2].
    # The copy reads input[3:4], not the receive, so the executor runs it without waiting:
    # whichever lands last wins. validate() must reject it.
    s = sched(2, [[[Send(1, inp(2, 2)), Recv(1, out(0, 2)), Copy(out(1, 1), inp(3, 1))]],
                  [[Send(0, inp(0, 2)), Recv(0, out(2, 2))]]])
    with pytest.raises(fmcomm.ScheduleError):
        validate(s, output_written=False)
