"""Rabenseifner's all-reduce: reduce-scatter by recursive halving, all-gather by
recursive doubling.

Let p' be the largest power of two <= p; ranks 0..p'-1 are the *core* and each extra
rank p'+i is folded onto core rank i, as in ``recursive_doubling``. The buffer is cut
into p' chunks (``chunk_bounds``); a *block* is a run of consecutive chunks.

Steps:

1. Fold (only when p is not a power of two; one round). Extra rank p'+i sends its
   input to rank i, which reduces ``output = in_i (op) in_(p'+i)``.
2. Reduce-scatter by recursive halving (lg p' rounds). Every core rank starts with
   the block of all p' chunks. In the round with mask m = p'/2, p'/4, ..., 1 rank v
   pairs with v XOR m; the pair splits its common block in two, the partner with bit
   m clear keeping the lower half. Each sends the half it gives away and reduces the
   half it keeps with the partner's copy (``low (op) high``, low = the partner with
   bit m clear). Afterwards rank v holds chunk v reduced over all ranks::

       p' = 4, chunks c0..c3     round 0 (m = 2)          round 1 (m = 1)
       rank 0 keeps              c0 c1  <- from 2         c0  <- from 1
       rank 1 keeps              c0 c1  <- from 3         c1  <- from 0
       rank 2 keeps              c2 c3  <- from 0         c2  <- from 3
       rank 3 keeps              c2 c3  <- from 1         c3  <- from 2

3. All-gather by recursive doubling (lg p' rounds), the same pairs in reverse order
   (m = 1, 2, ..., p'/2): each sends its block and receives the partner's, which is
   adjacent, so the block doubles; every range lands straight in the output.
4. Unfold (only when p is not a power of two; one round). Rank i sends the whole result
   to p'+i.

Every element is reduced by exactly one rank (its chunk's owner, along one fixed
tree of operations) and then only copied, so all ranks end with the same bytes.

Bytes sent per core rank (n elements; multiply by the item size): the reduce-scatter
gives away everything but the rank's own chunk, exactly n - |chunk v|; the all-gather
sends blocks of 1, 2, ..., p'/2 chunks, p'-1 chunks in all, each of floor(n/p') or
ceil(n/p') elements. So a core rank sends between n - ceil(n/p') + (p'-1)floor(n/p')
and n - floor(n/p') + (p'-1)ceil(n/p') elements, about 2((p'-1)/p')n, and all core
ranks together exactly 2(p'-1)n. Core ranks with an extra partner send n more (the
unfold); extra ranks send n (the fold). Scratch: half the buffer (the whole buffer on
a core rank that receives a fold).

Cost for p a power of two: 2 lg p·α + 2((p-1)/p)nβ + ((p-1)/p)nγ -- ring's bandwidth
with lg p instead of p - 1 latency terms. Otherwise fold and unfold add 2α + 2nβ + nγ.
"""
from __future__ import annotations

from ..schedule import Range, RankSchedule, RoundBuilder, chunk_bounds
from .recursive_doubling import extra_rank, fold_layout


def all_reduce(rank: int, world: int, count: int) -> RankSchedule:
    b = RoundBuilder(rank)
    n = count
    if world == 1:
        b.copy(Range("output", 0, n), Range("input", 0, n))
        return b.build()
    core, extras = fold_layout(world)
    steps = core.bit_length() - 1  # lg p'
    folded = extras > 0

    if rank >= core:  # reduce-scatter and all-gather: twice recursive doubling's rounds
        return extra_rank(b, rank - core, n, idle_rounds=2 * steps)

    offs = [o for o, _ in chunk_bounds(n, core)] + [n]

    def block(buf: str, lo: int, hi: int) -> Range:
        """Chunks lo..hi-1 of ``buf`` as one range."""
        return Range(buf, offs[lo], offs[hi] - offs[lo])

    partner = rank + core if rank + core < world else None
    cur = "input"  # where this rank's partial of the current block lives
    if folded:
        b.new_round()
        if partner is not None:
            b.need_scratch(n)
            b.recv(partner, Range("scratch", 0, n))
            b.reduce(Range("output", 0, n), Range("input", 0, n), Range("scratch", 0, n))  # lower rank first
            cur = "output"

    # Reduce-scatter: the block [lo, hi) halves every round, ending as chunk ``rank``.
    lo, hi = 0, core
    mask = core >> 1
    while mask:
        peer = rank ^ mask
        mid = (lo + hi) // 2
        keep, give = ((mid, hi), (lo, mid)) if rank & mask else ((lo, mid), (mid, hi))
        kept = block("output", *keep)
        landing = Range("scratch", 0, kept.count)
        b.need_scratch(kept.count)
        b.new_round()
        b.send(peer, block(cur, *give))
        b.recv(peer, landing)
        mine = block(cur, *keep)
        low, high = (mine, landing) if rank < peer else (landing, mine)
        b.reduce(kept, low, high)
        lo, hi = keep
        cur = "output"
        mask >>= 1

    # All-gather: the partner's block is adjacent to ours; together they double.
    mask = 1
    while mask < core:
        peer = rank ^ mask
        size = hi - lo
        theirs = (lo - size, lo) if rank & mask else (hi, hi + size)
        b.new_round()
        b.send(peer, block("output", lo, hi))
        b.recv(peer, block("output", *theirs))
        lo, hi = min(lo, theirs[0]), max(hi, theirs[1])
        mask <<= 1

    if folded:
        b.new_round()
        if partner is not None:
            b.send(partner, Range("output", 0, n))
    return b.build()
