"""Broadcast schedules: binomial tree and pipelined chain.

Layout (``torch.distributed.broadcast``): ``input`` and ``output`` have ``count``
elements and are the same memory in the usual, in-place call; only the root's input
matters, and every rank's output ends as the root's input. The schedules are correct
in place and out of place: the root sends from ``input`` and never writes it, the
others receive into ``output`` and forward from there. Ranks are numbered relative to
the root, v = (rank − root) mod p. Below p is the world size, n = count·itemsize the
bytes of the buffer, α the latency of a message and β the time per byte.

Round 0 of both is local: the root copies input into output (nothing to do in place;
the executor skips a copy onto itself). It is a round of its own because the root
sends in every later round, and ``fmcomm.schedule.validate`` forbids writing a range
in the round that sends it (with input and output as one memory).

binomial(rank, world, count, root)
    Then ⌈lg p⌉ rounds, k = 0, 1, …: relative ranks v < 2^k with v + 2^k < p send the
    whole buffer to v + 2^k, which receives it from v.
    Bytes sent by relative rank v: n·|{k : v < 2^k < p − v}| (the root ⌈lg p⌉·n, every
    rank v ≥ p/2 nothing). Cost: ⌈lg p⌉(α + nβ).

chain(rank, world, count, root, chunks=None)
    The buffer is cut into C = ``chunks`` pieces (``chunk_bounds``) that flow down the
    chain root → root+1 → … → root+p−1. Round t = 1 … C+p−2 (after the local one):
    relative rank v sends piece t−1−v to v+1 and receives piece t−v from v−1, where
    those exist. Bytes sent per rank: n for v < p−1, nothing for the last.
    Cost: (C + p − 2)(α + (n/C)β), minimal at C* = √((p−2)·nβ/α).
    Default (``chunks=None``): that optimum for α/β = 2^16 elements (256 KiB of
    4-byte elements, a round trip of tens of µs against GB/s links):
    C = round(√((p−2)·count / 2^16)), at least 1 and at most ``count``; so one piece
    (no pipelining) for p ≤ 2 or small buffers. An explicit ``chunks`` is also capped
    at ``count`` (empty pieces would only add rounds).
"""
from __future__ import annotations

import math

from ..errors import InvalidArgument
from ..schedule import Range, RankSchedule, RoundBuilder, chunk_bounds

ALPHA_OVER_BETA_ELEMENTS = 1 << 16


def _check_root(world: int, root: int) -> None:
    if not isinstance(root, int) or not 0 <= root < world:
        raise InvalidArgument(f"broadcast root {root!r} is outside 0..{world - 1}")


def _root_copy(b: RoundBuilder, v: int, count: int) -> None:
    b.new_round()
    if v == 0:
        b.copy(Range("output", 0, count), Range("input", 0, count))


def binomial(rank: int, world: int, count: int, root: int) -> RankSchedule:
    _check_root(world, root)
    p = world
    v = (rank - root) % p
    b = RoundBuilder(rank)
    _root_copy(b, v, count)
    src = Range("input" if v == 0 else "output", 0, count)
    mask = 1
    while mask < p:
        b.new_round()
        if v < mask and v + mask < p:
            b.send((rank + mask) % p, src)
        elif mask <= v < 2 * mask:
            b.recv((rank - mask) % p, Range("output", 0, count))
        mask <<= 1
    return b.build()


def default_chunks(world: int, count: int) -> int:
    """The ``chain`` default: the α–β optimum piece count for α/β = 2^16 elements."""
    if world <= 2 or count <= 1:
        return 1
    return max(1, min(count, round(math.sqrt((world - 2) * count / ALPHA_OVER_BETA_ELEMENTS))))


def chain(rank: int, world: int, count: int, root: int, chunks: int | None = None) -> RankSchedule:
    _check_root(world, root)
    if chunks is None:
        chunks = default_chunks(world, count)
    elif not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise InvalidArgument(f"broadcast chain: chunks must be a positive integer, not {chunks!r}")
    c = max(1, min(chunks, count))
    p = world
    v = (rank - root) % p
    b = RoundBuilder(rank)
    _root_copy(b, v, count)
    if p == 1:
        return b.build()
    pieces = chunk_bounds(count, c)
    src_buf = "input" if v == 0 else "output"
    nxt, prv = (rank + 1) % p, (rank - 1) % p
    for t in range(c + p - 2):
        b.new_round()
        k = t - v
        if v < p - 1 and 0 <= k < c:
            off, n = pieces[k]
            b.send(nxt, Range(src_buf, off, n))
        k = t - v + 1
        if v >= 1 and 0 <= k < c:
            off, n = pieces[k]
            b.recv(prv, Range("output", off, n))
    return b.build()
