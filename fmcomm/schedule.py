"""Schedules: what every rank does in a collective, as data.

Terms used throughout fmcomm:

- **buffer**: one of ``input``, ``output`` (the caller's tensors; the same memory when
  the call is in place) and ``scratch`` (fmcomm's own temporary space).
- **range**: ``count`` elements of a buffer from element ``offset``.
- **round**: a group of steps run together. First every send and receive of the round
  is posted (sends read their ranges as they are when the round starts), then the
  local steps (reduce, copy) run in order, each once the receives it reads have landed.
  A send of round *r* is always matched by a receive of round *r* on its peer, so
  rounds never deadlock.
- **segment**: the executor's unit of pipelining; a message longer than the segment
  size travels as several messages, and a reduce reading it runs segment by segment.
  Schedules do not see segments.

An algorithm is a pure function returning a :class:`RankSchedule` for one rank; it
never does I/O. The same schedule is validated (:func:`validate`), simulated
(``fmcomm.simulator``), executed (``fmcomm.runtime.executor``) and, later, priced.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence, Union

from .errors import ScheduleError

BUFFERS = ("input", "output", "scratch")


@dataclasses.dataclass(frozen=True)
class Range:
    buf: str
    offset: int
    count: int

    @property
    def end(self) -> int:
        return self.offset + self.count


@dataclasses.dataclass(frozen=True)
class Send:
    peer: int
    src: Range


@dataclasses.dataclass(frozen=True)
class Recv:
    peer: int
    dst: Range


@dataclasses.dataclass(frozen=True)
class Reduce:
    """dst = a (op) b, element-wise; dst may be the very range a or b."""
    dst: Range
    a: Range
    b: Range


@dataclasses.dataclass(frozen=True)
class Copy:
    dst: Range
    src: Range


Step = Union[Send, Recv, Reduce, Copy]


@dataclasses.dataclass(frozen=True)
class RankSchedule:
    rank: int
    rounds: tuple[tuple[Step, ...], ...]
    scratch_count: int = 0

    def peers(self) -> tuple[set[int], set[int]]:
        """(ranks this rank sends to, ranks it receives from)."""
        to, frm = set(), set()
        for rnd in self.rounds:
            for s in rnd:
                if isinstance(s, Send):
                    to.add(s.peer)
                elif isinstance(s, Recv):
                    frm.add(s.peer)
        return to, frm

    def bytes_sent(self, itemsize: int) -> int:
        return sum(s.src.count * itemsize for rnd in self.rounds for s in rnd if isinstance(s, Send))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Every rank's part of one collective on ``world`` ranks."""
    collective: str
    algo: str
    world: int
    input_count: int
    output_count: int
    ranks: tuple[RankSchedule, ...]


class RoundBuilder:
    """Collects a rank's rounds; algorithms read as their verbs (send, recv, reduce)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.rounds: list[list[Step]] = []
        self.scratch_count = 0

    def new_round(self) -> "RoundBuilder":
        self.rounds.append([])
        return self

    def _add(self, step: Step) -> None:
        if not self.rounds:
            self.new_round()
        self.rounds[-1].append(step)

    def need_scratch(self, count: int) -> None:
        self.scratch_count = max(self.scratch_count, count)

    def send(self, peer: int, src: Range) -> None:
        if src.count:
            self._add(Send(peer, src))

    def recv(self, peer: int, dst: Range) -> None:
        if dst.count:
            self._add(Recv(peer, dst))

    def reduce(self, dst: Range, a: Range, b: Range) -> None:
        if dst.count:
            self._add(Reduce(dst, a, b))

    def copy(self, dst: Range, src: Range) -> None:
        if dst.count:
            self._add(Copy(dst, src))

    def build(self) -> RankSchedule:
        # Empty rounds stay: round r must mean the same round on every rank.
        return RankSchedule(self.rank, tuple(tuple(r) for r in self.rounds), self.scratch_count)


def chunk_bounds(count: int, parts: int) -> list[tuple[int, int]]:
    """Split ``count`` elements into ``parts`` contiguous (offset, length) chunks.

    The first ``count % parts`` chunks get one element more; chunks may be empty when
    count < parts.
    """
    base, extra = divmod(count, parts)
    out, off = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((off, n))
        off += n
    return out


# ---------------------------------------------------------------- validation

def _memory(buf: str, in_place: bool) -> str:
    return "output" if (in_place and buf == "input") else buf


def _overlap(a: Range, b: Range, in_place: bool) -> bool:
    return (_memory(a.buf, in_place) == _memory(b.buf, in_place)
            and a.offset < b.end and b.offset < a.end and a.count > 0 and b.count > 0)


def _check_range(r: Range, sizes: dict[str, int], where: str) -> None:
    if r.buf not in sizes:
        raise ScheduleError(f"{where}: unknown buffer {r.buf!r}")
    if r.count < 0 or r.offset < 0 or r.end > sizes[r.buf]:
        raise ScheduleError(f"{where}: range {r.buf}[{r.offset}:{r.end}] outside its buffer of {sizes[r.buf]}")


def validate(sched: Schedule, *, output_written: bool = True, in_place: bool = True) -> None:
    """Raise ScheduleError unless ``sched`` is well formed for every rank.

    Checks: ranks numbered 0..world-1; every range in bounds; the input buffer never
    written; within a round no receive or local write overlaps a send or a receive
    (the executor could race on it), checked with input and output as one memory
    (the in-place case, the stricter one) unless ``in_place`` is False, for
    collectives whose callers must pass separate buffers; every send of
    round r matched, in order and in size, by a receive of round r on its peer; and,
    if ``output_written``, every output element written on every rank of a world
    larger than one.
    """
    world = sched.world
    if len(sched.ranks) != world or [r.rank for r in sched.ranks] != list(range(world)):
        raise ScheduleError(f"{sched.algo}: schedule must hold ranks 0..{world - 1} in order")
    for rs in sched.ranks:
        sizes = {"input": sched.input_count, "output": sched.output_count, "scratch": rs.scratch_count}
        written: list[tuple[int, int]] | None = [] if output_written else None
        for ri, rnd in enumerate(rs.rounds):
            where = f"{sched.algo} rank {rs.rank} round {ri}"
            sends, recvs, writes = [], [], []
            for step in rnd:
                if isinstance(step, Send):
                    if not 0 <= step.peer < world or step.peer == rs.rank:
                        raise ScheduleError(f"{where}: send to invalid peer {step.peer}")
                    _check_range(step.src, sizes, where)
                    sends.append(step.src)
                elif isinstance(step, Recv):
                    if not 0 <= step.peer < world or step.peer == rs.rank:
                        raise ScheduleError(f"{where}: receive from invalid peer {step.peer}")
                    _check_range(step.dst, sizes, where)
                    recvs.append(step.dst)
                elif isinstance(step, (Reduce, Copy)):
                    srcs = (step.a, step.b) if isinstance(step, Reduce) else (step.src,)
                    for r in (step.dst, *srcs):
                        _check_range(r, sizes, where)
                        if r.count != step.dst.count:
                            raise ScheduleError(f"{where}: {type(step).__name__} operands differ in length")
                    for s in srcs:
                        if _overlap(s, step.dst, in_place) and (s.offset != step.dst.offset
                                                            or _memory(s.buf, in_place) != _memory(step.dst.buf, in_place)):
                            raise ScheduleError(f"{where}: {type(step).__name__} source partly overlaps its destination")
                    writes.append(step.dst)
                else:
                    raise ScheduleError(f"{where}: unknown step {step!r}")
            for w in (*recvs, *writes):
                if w.buf == "input":
                    raise ScheduleError(f"{where}: writes the input buffer")
                if written is not None and w.buf == "output":
                    written.append((w.offset, w.end))
            for i, a in enumerate(recvs):
                for s in sends:
                    if _overlap(a, s, in_place):
                        raise ScheduleError(f"{where}: a receive lands on a range being sent")
                for b in recvs[i + 1:]:
                    if _overlap(a, b, in_place):
                        raise ScheduleError(f"{where}: two receives land on one range")
            for w in writes:
                for s in sends:
                    if _overlap(w, s, in_place):
                        raise ScheduleError(f"{where}: a local step writes a range being sent")
                for a in recvs:
                    if _overlap(w, a, in_place):
                        raise ScheduleError(f"{where}: a local step writes a range being received")
        if written is not None and world > 1:
            first = _first_uncovered(written, sched.output_count)
            if first is not None:
                raise ScheduleError(f"{sched.algo} rank {rs.rank}: output element {first} is never written")
    _check_matching(sched)


def _first_uncovered(intervals: list[tuple[int, int]], count: int) -> int | None:
    reach = 0
    for lo, hi in sorted(intervals):
        if lo > reach:
            return reach
        reach = max(reach, hi)
    return reach if reach < count else None


def _check_matching(sched: Schedule) -> None:
    n_rounds = max((len(r.rounds) for r in sched.ranks), default=0)
    for ri in range(n_rounds):
        # (src, dst) -> list of message lengths, in posting order
        sent: dict[tuple[int, int], list[int]] = {}
        recvd: dict[tuple[int, int], list[int]] = {}
        for rs in sched.ranks:
            if ri >= len(rs.rounds):
                continue
            for s in rs.rounds[ri]:
                if isinstance(s, Send):
                    sent.setdefault((rs.rank, s.peer), []).append(s.src.count)
                elif isinstance(s, Recv):
                    recvd.setdefault((s.peer, rs.rank), []).append(s.dst.count)
        for key in sent.keys() | recvd.keys():
            if sent.get(key, []) != recvd.get(key, []):
                src, dst = key
                raise ScheduleError(
                    f"{sched.algo} round {ri}: rank {src} sends {sent.get(key, [])} elements to rank {dst}, "
                    f"which receives {recvd.get(key, [])}")


def build(collective: str, algo: str, fn, world: int, input_count: int, output_count: int,
          ranks: Iterable[int] | None = None, **params) -> Schedule:
    """Call algorithm ``fn(rank, world, ...)`` for every rank and bundle the result."""
    per_rank: Sequence[RankSchedule] = tuple(fn(r, world, **params) for r in (ranks or range(world)))
    return Schedule(collective, algo, world, input_count, output_count, tuple(per_rank))
