"""Ring all-reduce, and its two halves: ring reduce-scatter and ring all-gather.

The p ranks form a ring; rank r sends to r+1 and receives from r-1 (mod p). The
buffer is cut into p chunks (``chunk_bounds``).

Reduce-scatter, p-1 rounds. In round s rank r sends chunk (r-s) mod p to its right
and receives chunk (r-s-1) mod p from its left into scratch, then folds it into its
own copy of that chunk. After the last round rank r holds chunk (r+1) mod p reduced
over all ranks::

    round 0:  r0 -c0-> r1 -c1-> r2 -c2-> r0      (p = 3)
    round 1:  r0 -c2-> r1 -c0-> r2 -c1-> r0      now r0 owns c1, r1 owns c2, r2 owns c0

All-gather, p-1 rounds. In round s rank r sends chunk (r+1-s) mod p to its right
and receives chunk (r-s) mod p from its left straight into the output.

Per rank each half sends (p-1)/p of the buffer, so all-reduce puts 2(p-1)/p · n bytes
on the wire per rank and costs 2(p-1)α + 2((p-1)/p)nβ + ((p-1)/p)nγ.
Each chunk is reduced in one fixed order along the ring and then copied, so every
rank ends with the same bytes.
"""
from __future__ import annotations

from ..schedule import Range, RankSchedule, RoundBuilder, chunk_bounds


def reduce_scatter_rounds(b: RoundBuilder, world: int, count: int) -> int:
    """Append the ring reduce-scatter to ``b``; return the chunk this rank then owns.

    Round 0 reads the chunk from ``input``; later rounds forward the partial result
    kept in ``output``.
    """
    r = b.rank
    chunks = chunk_bounds(count, world)
    right, left = (r + 1) % world, (r - 1) % world
    b.need_scratch(max(n for _, n in chunks))
    for s in range(world - 1):
        send_c = (r - s) % world
        recv_c = (r - s - 1) % world
        b.new_round()
        off, n = chunks[send_c]
        b.send(right, Range("input" if s == 0 else "output", off, n))
        off, n = chunks[recv_c]
        b.recv(left, Range("scratch", 0, n))
        b.reduce(Range("output", off, n), Range("input", off, n), Range("scratch", 0, n))
    return (r + 1) % world


def all_gather_rounds(b: RoundBuilder, world: int, count: int, owned: int) -> None:
    """Append the ring all-gather of ``output``'s chunks, this rank starting with ``owned``."""
    r = b.rank
    chunks = chunk_bounds(count, world)
    right, left = (r + 1) % world, (r - 1) % world
    # In the reduce-scatter layout rank r owns chunk r+1; shift so the formula holds for any start.
    shift = owned - (r + 1)
    for s in range(world - 1):
        b.new_round()
        off, n = chunks[(r + 1 - s + shift) % world]
        b.send(right, Range("output", off, n))
        off, n = chunks[(r - s + shift) % world]
        b.recv(left, Range("output", off, n))


def all_reduce(rank: int, world: int, count: int) -> RankSchedule:
    b = RoundBuilder(rank)
    if world == 1:
        b.copy(Range("output", 0, count), Range("input", 0, count))
        return b.build()
    owned = reduce_scatter_rounds(b, world, count)
    all_gather_rounds(b, world, count, owned)
    return b.build()
