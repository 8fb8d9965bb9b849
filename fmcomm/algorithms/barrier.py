"""Barrier schedule: dissemination.

A barrier moves no user data (input and output have 0 elements); each message is one
element of scratch, there only to carry the synchronisation. Below p is the world
size and α the latency of a message.

dissemination(rank, world)
    ⌈lg p⌉ rounds, k = 0, 1, …: rank r sends one element to (r + 2^k) mod p and
    receives one from (r − 2^k) mod p. After round k a rank has heard, directly or
    through others, from the 2^(k+1) ranks r, r−1, …, r−2^(k+1)+1, so after the last
    round from all p: no rank leaves before every rank has entered.
    The element sent is scratch[0], the one received lands in scratch[1] (two
    elements: a round may not receive into the range it sends). The values are never
    read. Bytes sent per rank: ⌈lg p⌉·itemsize. Cost: ⌈lg p⌉α.

    World 1: no rounds.
"""
from __future__ import annotations

from ..schedule import Range, RankSchedule, RoundBuilder


def dissemination(rank: int, world: int) -> RankSchedule:
    b = RoundBuilder(rank)
    d = 1
    while d < world:
        b.need_scratch(2)
        b.new_round()
        b.send((rank + d) % world, Range("scratch", 0, 1))
        b.recv((rank - d) % world, Range("scratch", 1, 1))
        d <<= 1
    return b.build()
