"""Reduce schedule: binomial tree.

Layout (``torch.distributed.reduce``): ``input`` and ``output`` have ``count``
elements (the same memory in the usual, in-place call). Only the root's output holds
the result; every other rank's output is left exactly as it was (partial sums live in
scratch), so validate such a schedule with ``validate(sched, output_written=False)``.
Ranks are numbered relative to the root, v = (rank − root) mod p. Below p is the
world size, n = count·itemsize the bytes of the buffer, α the latency of a message,
β the time per byte sent, γ the time per byte reduced; ⊕ the reduction.

binomial(rank, world, count, root)
    ⌈lg p⌉ rounds, k = 0, 1, …: relative rank v whose lowest set bit is 2^k sends its
    partial to v − 2^k and is done; a rank v divisible by 2^(k+1) with v + 2^k < p
    receives the partial of v + 2^k into scratch and keeps own ⊕ received. A leaf
    sends its input, an inner rank its scratch partial; the root accumulates in its
    output (in place that reads its input first: input is read only in round 0,
    before anything is written). Order, fixed, with T_v the partial of v::

        T_v = (…((x_v ⊕ T_{v+1}) ⊕ T_{v+2}) ⊕ T_{v+4}) ⊕ …   (terms with v+2^k < p
                                                           and 2^k below v's lowest bit)
        result = T_0 (x and T numbered relative to the root)

    Bytes sent per rank: n by every rank but the root, which sends nothing.
    Cost: ⌈lg p⌉(α + nβ + nγ). Scratch: count elements on the root, 2·count on inner
    ranks, none on leaves.

    World 1: one copy of input into output.

Note for the executor: ``avg`` must divide on the root only (the others' outputs are
not results).
"""
from __future__ import annotations

from ..errors import InvalidArgument
from ..schedule import Range, RankSchedule, RoundBuilder


def binomial(rank: int, world: int, count: int, root: int) -> RankSchedule:
    if not isinstance(root, int) or not 0 <= root < world:
        raise InvalidArgument(f"reduce root {root!r} is outside 0..{world - 1}")
    p = world
    b = RoundBuilder(rank)
    if p == 1:
        b.copy(Range("output", 0, count), Range("input", 0, count))
        return b.build()
    v = (rank - root) % p
    lowbit = v & -v if v else 1 << p.bit_length()
    if v == 0:
        acc, recv = Range("output", 0, count), Range("scratch", 0, count)
    else:
        acc, recv = Range("scratch", 0, count), Range("scratch", count, count)
    cur = Range("input", 0, count)
    mask = 1
    while mask < p:
        b.new_round()
        if mask == lowbit:
            b.send((rank - mask) % p, cur)
        elif mask < lowbit and v + mask < p:
            b.recv((rank + mask) % p, recv)
            b.reduce(acc, cur, recv)
            b.need_scratch(recv.end)
            cur = acc
        mask <<= 1
    return b.build()
