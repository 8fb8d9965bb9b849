"""Reduce-scatter schedules: ring and recursive halving.

Layout (``torch.distributed.reduce_scatter_tensor``): ``input`` has p·count elements,
block j = input[j·count : (j+1)·count] is rank j's share; ``output`` has ``count``
elements, and rank r's output is the reduction over all ranks of their input block r.
Below p is the world size, n = p·count·itemsize the bytes of the full input, α the
latency of a message, β the time per byte sent, γ the time per byte reduced; ⊕ is the
reduction, always computed as ``reduce(dst, a, b)``: dst = a ⊕ b with ``a`` this
rank's own value and ``b`` the received one.

Both schedules are correct out of place (the usual torch call) and also where
``output`` is the very memory of input block r (torch's in-place layout): partial
results live in scratch and ``output`` is written once, by the last reduce, which
reads input block r element by element. Input is never written.

ring(rank, world, count)
    p−1 rounds. In round s (0 ≤ s ≤ p−2) rank r sends its partial of block
    (r−s−1) mod p to r+1 (round 0: straight from its input), receives the partial of
    block (r−s−2) mod p from r−1 into scratch and folds it into its own input block:
    partial = input block ⊕ received. In the last round that block is r and the
    result lands in ``output``. So block b is reduced along the ring starting at
    rank b+1::

        out_b = x_b ⊕ (x_{b−1} ⊕ (… ⊕ (x_{b+2} ⊕ x_{b+1})))     (ranks mod p)

    Bytes sent per rank: (p−1)·count·itemsize = ((p−1)/p)·n.
    Cost: (p−1)α + ((p−1)/p)nβ + ((p−1)/p)nγ. Scratch: min(3, p−1)·count elements
    (one receive slot, two partial slots used alternately: a round sends one partial
    while writing the next).

halving(rank, world, count)
    Recursive halving over the largest power of two P = 2^m ≤ p; e = p − P ranks are
    extra. Virtual rank v < P owns block v and, if v < e, also block P+v (the block of
    extra rank P+v); a "window" of virtual ranks [lo, lo+w) stands for blocks
    [lo, lo+w) and [P+lo, P+min(lo+w, e)), at most two contiguous ranges.

    1. Fold (only if e > 0): extra rank P+i sends its whole input to rank i, which
       keeps y_i = x_i ⊕ x_{P+i} (all p blocks) in scratch.
    2. m halving rounds, distance d = P/2, P/4, …, 1: rank v pairs with v XOR d, splits
       its current window of 2d virtual ranks in two, sends the half without v and
       receives the partner's partial of the half with v, then keeps
       own ⊕ received. A rank that did not fold sends its first half from input.
       The last round puts block v straight into ``output``.
    3. Unfold (only if e > 0): rank i < e sends its result of block P+i to rank P+i,
       which receives it into ``output``.

    With T_j(v, m) = x_v[j] (or y_v[j] if v folded) and
    T_j(v, l) = T_j(v, l+1) ⊕ T_j(v XOR 2^l, l+1), block j's result is T_j(j, 0) for
    j < P and T_{j}(j−P, 0) for j ≥ P: a fixed tree, so the bytes are deterministic.

    Bytes sent per rank: extra ranks n (their whole input, once); every other rank
    (p−1)·count·itemsize = ((p−1)/p)·n (the halves it sends hold every block but its
    own, v and P+v; a folding rank then sends block P+v to its extra rank).
    Cost, p a power of two: (lg p)α + ((p−1)/p)nβ + ((p−1)/p)nγ. Otherwise
    (m+2)α + (n + h + n/p)β + (n + h)γ, with h = (P − 1 + Σ_d min(d, e))·n/p the
    halving rounds' share: each round is as long as its largest half, d blocks plus
    the min(d, e) extra blocks of the half starting at virtual rank 0.
    Scratch: 2p·count elements on folding ranks (the extra's input and the folded
    copy), about p·count on the others.

When the last round to produce ``output`` is also a round that sends from ``input``
(ring and halving on p = 2, halving's non-folding ranks on p = 3), that final reduce
runs one round later, in a round of its own (p = 2) or in the unfold round (p = 3).
Nothing is waited for longer: it reads only what the previous round received. The
reason is ``fmcomm.schedule.validate``, which checks every round with input and
output as one memory starting at the same offset, so a send of input block 0 and a
write of ``output`` in one round count as a race there.

World 1: a single copy of input block 0 into output.
"""
from __future__ import annotations

from ..schedule import Range, RankSchedule, RoundBuilder


def _world_one(b: RoundBuilder, count: int) -> RankSchedule:
    b.copy(Range("output", 0, count), Range("input", 0, count))
    return b.build()


def ring(rank: int, world: int, count: int) -> RankSchedule:
    b = RoundBuilder(rank)
    p = world
    if p == 1:
        return _world_one(b, count)
    right, left = (rank + 1) % p, (rank - 1) % p
    last = p - 2
    recv_slot = Range("scratch", 0, count)

    def partial(s: int) -> Range:  # where the partial of round s (< last) lives
        return Range("scratch", (1 + s % 2) * count, count)

    b.need_scratch(min(3, p - 1) * count)
    deferred = None
    for s in range(p - 1):
        b.new_round()
        send_blk = (rank - s - 1) % p
        b.send(right, Range("input", send_blk * count, count) if s == 0 else partial(s - 1))
        blk = (rank - s - 2) % p
        b.recv(left, recv_slot)
        mine = Range("input", blk * count, count)
        if s < last:
            b.reduce(partial(s), mine, recv_slot)
        elif s == 0:  # p == 2: this round also sends input block 0 (see the module docstring)
            deferred = (Range("output", 0, count), mine, recv_slot)
        else:
            b.reduce(Range("output", 0, count), mine, recv_slot)
    if deferred is not None:
        b.new_round()
        b.reduce(*deferred)
    return b.build()


def halving(rank: int, world: int, count: int) -> RankSchedule:
    b = RoundBuilder(rank)
    p = world
    if p == 1:
        return _world_one(b, count)
    m = p.bit_length() - 1
    P = 1 << m
    e = p - P

    def blocks(lo: int, w: int) -> list[tuple[int, int]]:
        """(first block, number of blocks) ranges of the virtual-rank window [lo, lo+w)."""
        out = [(lo, w)]
        extra = min(lo + w, e) - lo
        if extra > 0:
            out.append((P + lo, extra))
        return out

    if rank >= P:  # an extra rank: fold in, wait, get its block back
        v = rank - P
        b.new_round()
        b.send(v, Range("input", 0, p * count))
        for _ in range(m):
            b.new_round()
        b.new_round()
        b.recv(v, Range("output", 0, count))
        return b.build()

    v = rank
    folded = v < e
    d0 = P >> 1
    if folded:
        base, width = 0, P  # scratch holds all p blocks at their own offsets
        s_size = p * count
    else:
        lo = (v // (2 * d0)) * 2 * d0
        base = lo + d0 if v & d0 else lo  # the window kept after the first halving round
        width = d0
        s_size = sum(nb for _, nb in blocks(base, d0)) * count

    def s_range(j: int, nb: int) -> Range:
        slot = (j - base) if j < P else (width + j - P - base)
        return Range("scratch", slot * count, nb * count)

    r0 = s_size  # receive area, after the partials
    recv_max = 0
    if e:
        b.new_round()
        if folded:
            b.recv(P + v, Range("scratch", r0, p * count))
            b.reduce(Range("scratch", 0, p * count), Range("input", 0, p * count),
                     Range("scratch", r0, p * count))
            recv_max = p * count

    deferred = None
    d, first = d0, True
    while d >= 1:
        b.new_round()
        lo = (v // (2 * d)) * 2 * d
        kept_lo, sent_lo = (lo + d, lo) if v & d else (lo, lo + d)
        partner = v ^ d
        from_input = first and not folded

        def src(j: int, nb: int) -> Range:
            return Range("input", j * count, nb * count) if from_input else s_range(j, nb)

        for j, nb in blocks(sent_lo, d):
            b.send(partner, src(j, nb))
        off = r0
        received = []
        for j, nb in blocks(kept_lo, d):
            rr = Range("scratch", off, nb * count)
            b.recv(partner, rr)
            received.append((j, nb, rr))
            off += nb * count
        recv_max = max(recv_max, off - r0)
        for j, nb, rr in received:
            if d == 1 and j == v:
                step = (Range("output", 0, count), src(j, nb), rr)
                if from_input:  # p = 2 or 3 (see the module docstring)
                    deferred = step
                else:
                    b.reduce(*step)
            else:
                b.reduce(s_range(j, nb), src(j, nb), rr)
        first = False
        d >>= 1

    if e:
        b.new_round()
        if folded:
            b.send(P + v, s_range(P + v, 1))
    elif deferred is not None:
        b.new_round()
    if deferred is not None:
        b.reduce(*deferred)
    b.need_scratch(s_size + recv_max)
    return b.build()
