"""Recursive-doubling all-reduce: lg p rounds, each exchanging the whole buffer.

Let p' be the largest power of two <= p. Ranks 0..p'-1 are the *core*; each extra
rank e = p' + i (i < p - p') is folded onto core rank i.

Steps:

1. Fold (only when p is not a power of two; one round). Extra rank p'+i sends its
   input to rank i, which reduces ``output = in_i (op) in_(p'+i)``.
2. Recursive doubling (lg p' rounds). In round k core rank v exchanges its whole
   partial result with v XOR 2^k and both compute ``low (op) high``, where ``low`` is
   the partial of the partner with bit k clear. Each partial then covers the block of
   2^(k+1) core ranks sharing v's upper bits (and their folded extras)::

       p' = 8      round 0 (xor 1)   round 1 (xor 2)   round 2 (xor 4)
                   0<->1  2<->3      0<->2  1<->3      0<->4  1<->5
                   4<->5  6<->7      4<->6  5<->7      2<->6  3<->7
       blocks:     {01}{23}{45}{67}  {0123}{4567}      {01234567}

3. Unfold (only when p is not a power of two; one round). Rank i sends the result to
   p'+i, which receives it straight into its output.

Identical bytes everywhere: after round k the two partners hold bitwise the same value
(induction: both computed ``low (op) high`` from the same two operands, in the same
operand order; operand order matters even where ``op`` commutes, e.g. ``min(+0, -0)``),
so every core rank ends with the same bytes, and extras receive a copy.

Buffers. The whole buffer is sent every round, and a round that sends a range may not
write it (in place, input is output), so the partial moves between three places: the
output and two scratch halves X, Y (scratch is 2n on core ranks). Round k sends the
current partial, receives the partner's into a free place and reduces into the third;
the last round reduces into the output. With a single doubling round (p' = 2) the
first round cannot write the output, so the result lands in X and a local copy
follows: in the unfold round, or (p = 2) in one extra round without messages.

Bytes sent per rank (n bytes): core ranks n·lg p', plus n for core ranks with an
extra partner; extra ranks n. For a power of two every rank sends exactly n·lg p.

Cost: lg p·α + n·lg p·β + n·lg p·γ for p a power of two; otherwise
(lg p' + 2)·α + n(lg p' + 2)·β + n(lg p' + 1)·γ (fold and unfold add 2α + 2nβ + nγ).
At p = 2 the copy round adds one message-free round and a local copy of n.
Latency-optimal among algorithms that exchange whole buffers, so it suits small
messages; its n·lg p bandwidth term makes it lose to ring and Rabenseifner for large.
"""
from __future__ import annotations

from ..schedule import Range, RankSchedule, RoundBuilder


def fold_layout(world: int) -> tuple[int, int]:
    """(p', number of extra ranks): the largest power of two <= world, and world - p'."""
    core = 1 << (world.bit_length() - 1)
    return core, world - core


def extra_rank(b: RoundBuilder, partner: int, n: int, idle_rounds: int) -> RankSchedule:
    """An extra rank's whole part in a fold: send its data to its core partner, idle
    while the core ranks work, receive the result back."""
    b.new_round()
    b.send(partner, Range("input", 0, n))
    for _ in range(idle_rounds):
        b.new_round()
    b.new_round()
    b.recv(partner, Range("output", 0, n))
    return b.build()


def all_reduce(rank: int, world: int, count: int) -> RankSchedule:
    b = RoundBuilder(rank)
    n = count
    out = Range("output", 0, n)
    if world == 1:
        b.copy(out, Range("input", 0, n))
        return b.build()
    core, extras = fold_layout(world)
    steps = core.bit_length() - 1  # lg p'
    folded = extras > 0

    if rank >= core:
        return extra_rank(b, rank - core, n, idle_rounds=steps)

    places = {"X": Range("scratch", 0, n), "Y": Range("scratch", n, n), "O": out}
    b.need_scratch(2 * n)
    partner = rank + core if rank + core < world else None
    cur = "I"  # where this rank's partial lives; "I" (the input) is the output's memory in place
    if folded:
        b.new_round()
        if partner is not None:
            b.recv(partner, places["X"])
            b.reduce(out, Range("input", 0, n), places["X"])  # lower rank first
            cur = "O"

    for k in range(steps):
        peer = rank ^ (1 << k)
        last = k == steps - 1
        # Round 0 sends the input or the output (one memory in place), so it may write
        # neither; later rounds send X or Y. Partials alternate X, Y, ..., the last one
        # lands in the output; the received partial goes to the place left over.
        busy = "O" if cur in ("I", "O") else cur
        dst = "O" if last and k > 0 else ("X" if k % 2 == 0 else "Y")
        landing = next(p for p in ("Y", "X", "O") if p != busy and p != dst)
        src = Range("input", 0, n) if cur == "I" else places[cur]
        b.new_round()
        b.send(peer, src)
        b.recv(peer, places[landing])
        low, high = (src, places[landing]) if rank < peer else (places[landing], src)
        b.reduce(places[dst], low, high)
        cur = dst

    if folded:
        b.new_round()
        if partner is not None:
            b.send(partner, places[cur])
    elif cur != "O":
        b.new_round()  # p = 2: the copy cannot share the round that sent the input
    if cur != "O":
        b.copy(out, places[cur])
    return b.build()
