"""All-gather schedules: ring and recursive doubling (Bruck-style for non-powers of two).

Layout (``torch.distributed.all_gather_into_tensor``): ``input`` has ``count``
elements, ``output`` has p·count, and output block j = output[j·count : (j+1)·count]
ends as rank j's input on every rank. Below p is the world size, n = p·count·itemsize
the bytes of the full output, α the latency of a message and β the time per byte.

Both schedules start with a local round: rank r copies its input into output block r;
after it every message is sent from and received into ``output``, so input is read
once and never written. That makes them correct out of place and also where input is
the very memory of output block r (torch's in-place layout; the copy is then onto
itself). It also keeps ``fmcomm.schedule.validate`` content: it checks every round
with input and output as one memory from offset 0, so sending input in a round that
receives output block 0 would count as a race there.

ring(rank, world, count)
    Round 0: the local copy. Rounds 1..p−1 (s = round − 1): rank r sends block
    (r−s) mod p to r+1 and receives block (r−s−1) mod p from r−1.
    Bytes sent per rank: (p−1)·count·itemsize = ((p−1)/p)·n.
    Cost: (p−1)α + ((p−1)/p)nβ.

recursive_doubling(rank, world, count)
    Round 0: the local copy. Then ⌈lg p⌉ rounds, k = 0, 1, …, distance d = 2^k.

    p a power of two (recursive doubling): rank r exchanges with r XOR d the d blocks
    it holds, blocks [⌊r/d⌋·d, ⌊r/d⌋·d + d), and receives the partner's d blocks.

    p not a power of two (Bruck's dissemination, no final rotation): rank r holds
    blocks r, r+1, …, r+d−1 (mod p) at the start of round k; it sends the first
    c = min(d, p−d) of them to r−d and receives blocks r+d, …, r+d+c−1 (mod p) from
    r+d. Blocks go straight to their place in ``output``, so a run of blocks that wraps
    past block p−1 travels as two messages (the same split on both ends).

    Bytes sent per rank: (p−1)·count·itemsize = ((p−1)/p)·n in both cases
    (Σ_k min(2^k, p−2^k) = p−1). Cost: ⌈lg p⌉α + ((p−1)/p)nβ.
"""
from __future__ import annotations

from ..schedule import Range, RankSchedule, RoundBuilder
from ..topology.model import group_by_node


def _own_block(b: RoundBuilder, count: int) -> None:
    b.new_round()
    b.copy(Range("output", b.rank * count, count), Range("input", 0, count))


def _blocks(count: int, first: int, nb: int) -> Range:
    return Range("output", first * count, nb * count)


def ring(rank: int, world: int, count: int) -> RankSchedule:
    b = RoundBuilder(rank)
    p = world
    _own_block(b, count)
    right, left = (rank + 1) % p, (rank - 1) % p
    for s in range(p - 1):
        b.new_round()
        b.send(right, _blocks(count, (rank - s) % p, 1))
        b.recv(left, _blocks(count, (rank - s - 1) % p, 1))
    return b.build()


def _wrapped(start: int, n: int, p: int) -> list[tuple[int, int]]:
    """Blocks start, start+1, …, start+n−1 (mod p) as (first, number) runs in that order."""
    start %= p
    head = min(n, p - start)
    return [(start, head)] + ([(0, n - head)] if n > head else [])


def recursive_doubling(rank: int, world: int, count: int) -> RankSchedule:
    b = RoundBuilder(rank)
    p = world
    _own_block(b, count)
    d = 1
    if p & (p - 1) == 0:
        while d < p:
            b.new_round()
            partner = rank ^ d
            b.send(partner, _blocks(count, (rank // d) * d, d))
            b.recv(partner, _blocks(count, (partner // d) * d, d))
            d <<= 1
        return b.build()
    while d < p:
        b.new_round()
        c = min(d, p - d)
        for first, nb in _wrapped(rank, c, p):
            b.send((rank - d) % p, _blocks(count, first, nb))
        for first, nb in _wrapped(rank + d, c, p):
            b.recv((rank + d) % p, _blocks(count, first, nb))
        d <<= 1
    return b.build()


def hierarchical(rank: int, world: int, count: int, node_of: tuple[int, ...] | None = None) -> RankSchedule:
    """All-gather in three levels: inside each node, across nodes, inside again.

    Node k holds L_k ranks (local ranks, in rank order); L = max L_k, N nodes.
    Round 0: the local copy. Then:
    1. L−1 rounds inside the node: in round s local rank i sends its own block to
       local rank i+s and receives local rank i−s's block (mod L_k; a node with fewer
       ranks idles in the rounds it lacks).
    2. N−1 rounds across nodes: in round t node k sends to node k+t. Each rank q sends
       its own block to one rank of the target node, local rank (local(q) mod L_target),
       so every local rank uses the network at once and each foreign block crosses
       to each node exactly once.
    3. L−1 rounds inside the node: every rank hands the foreign blocks it received to
       the other local ranks (round s: to local rank i+s, from i−s).

    Bytes leaving node k: (N−1)·L_k·count·itemsize, the least possible (each other
    node needs node k's blocks once); a flat ring sends more off-node whenever a
    node's ranks are consecutive in the ring (2×2: 3 blocks per node against 2).
    Cost per rank, c = count·itemsize and F the foreign blocks it receives
    (about (p−L_k)/L_k): 2(L−1)α_intra + (N−1)α_inter + (L_k−1)(1 + F)·c·β_intra
    + (N−1)·c·β_inter.
    """
    node_of = tuple(node_of) if node_of is not None else (0,) * world
    b = RoundBuilder(rank)
    _own_block(b, count)
    node_list = group_by_node(node_of)
    mine = next(n for n in node_list if rank in n)
    k, i, width = node_list.index(mine), mine.index(rank), len(mine)
    most = max(len(n) for n in node_list)
    n_nodes = len(node_list)
    local_index = {q: j for node in node_list for j, q in enumerate(node)}

    def local(q: int) -> int:
        return local_index[q]

    # 1. own blocks around the node
    for s in range(1, most):
        b.new_round()
        if s < width:
            b.send(mine[(i + s) % width], _blocks(count, rank, 1))
            b.recv(mine[(i - s) % width], _blocks(count, mine[(i - s) % width], 1))
    # 2. own block to one rank of every other node
    received: list[int] = []  # foreign blocks this rank receives, in order
    for t in range(1, n_nodes):
        b.new_round()
        target, source = node_list[(k + t) % n_nodes], node_list[(k - t) % n_nodes]
        b.send(target[i % len(target)], _blocks(count, rank, 1))
        for q in source:
            if local(q) % width == i:
                b.recv(q, _blocks(count, q, 1))
                received.append(q)
    # 3. foreign blocks around the node
    for s in range(1, most):
        b.new_round()
        if s >= width:
            continue
        to, frm = mine[(i + s) % width], mine[(i - s) % width]
        for q in received:
            b.send(to, _blocks(count, q, 1))
        for t in range(1, n_nodes):
            for q in node_list[(k - t) % n_nodes]:
                if local(q) % width == (i - s) % width:
                    b.recv(frm, _blocks(count, q, 1))
    return b.build()
