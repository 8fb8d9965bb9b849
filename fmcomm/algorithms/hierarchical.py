"""Hierarchical all-reduce: reduce inside each node, all-reduce across nodes, gather inside.

Terms: a node holds L_k ranks (its local ranks, in rank order); L = max L_k. The
buffer is cut into L **lanes** (``chunk_bounds``), the same cut on every node; on a
node with L_k ranks, local rank i owns lanes i, i+L_k, i+2L_k, ... (so a node with
fewer ranks gives some ranks several lanes).

1. Intra-node reduce-scatter, L-1 rounds: in round s, local rank i sends the lanes
   owned by local rank i+s to it and receives its own lanes from local rank i-s, and
   reduces them in. Each lane's node sum is then held by its owner.
2. Inter-node all-reduce, 2(N-1) rounds: for every lane, the owners of that lane on the
   N nodes run a ring all-reduce on it (reduce-scatter then all-gather). Every local
   rank uses the network at once, each on its own lanes.
3. Intra-node all-gather, L-1 rounds: owners send their finished lanes to every other
   local rank.

Per node, the bytes that leave the node are 2(N-1)/N · S for S bytes (shared by its
local ranks), against the flat ring's 2(p-1)/p · S per rank crossing the network
from every rank whose neighbour is on another node. Cost, with α/β of each level
(intra, inter): 2(L-1)α_intra + 2((L-1)/L)Sβ_intra + 2(N-1)α_inter + 2((N-1)/N)(S/L)β_inter
+ the reductions. Each element is reduced in one fixed order (owner's local sum, then
the cross-node ring), then copied, so every rank ends with identical bytes.
"""
from __future__ import annotations

from ..schedule import Range, RankSchedule, RoundBuilder, chunk_bounds
from ..topology.model import group_by_node


def all_reduce(rank: int, world: int, count: int, node_of: tuple[int, ...] | None = None) -> RankSchedule:
    node_of = tuple(node_of) if node_of is not None else (0,) * world
    if len(node_of) != world:
        raise ValueError(f"node_of has {len(node_of)} entries for {world} ranks")
    b = RoundBuilder(rank)
    if world == 1:
        b.copy(Range("output", 0, count), Range("input", 0, count))
        return b.build()
    nodes = group_by_node(node_of)
    mine = next(n for n in nodes if rank in n)
    node_index = nodes.index(mine)
    local, width = mine.index(rank), len(mine)
    lanes_total = max(len(n) for n in nodes)
    lanes = chunk_bounds(count, lanes_total)

    def owner(node: list[int], lane: int) -> int:
        return node[lane % len(node)]

    own = [j for j in range(lanes_total) if owner(mine, j) == rank]
    own_len = sum(lanes[j][1] for j in own)
    b.need_scratch(max(own_len, max((n for _, n in lanes), default=0)))

    # Phase 1: every rank reduces its own lanes; round s pairs local i with i±s.
    started = set()
    for s in range(1, lanes_total):
        b.new_round()
        if s >= width:
            continue  # this node has fewer ranks than s+1: nothing to do this round
        to, frm = mine[(local + s) % width], mine[(local - s) % width]
        for j in range(lanes_total):
            if owner(mine, j) == to:
                b.send(to, Range("input", *lanes[j]))
        at = 0
        for j in own:
            off, n = lanes[j]
            b.recv(frm, Range("scratch", at, n))
            # The first fold reads the input, later ones the running sum.
            first = Range("input", off, n) if j not in started else Range("output", off, n)
            b.reduce(Range("output", off, n), first, Range("scratch", at, n))
            started.add(j)
            at += n
    if width == 1:
        for j in own:
            b.copy(Range("output", *lanes[j]), Range("input", *lanes[j]))
    # Phase 2: a ring over the nodes for each lane, among that lane's owners.
    n_nodes = len(nodes)
    for step in range(2 * (n_nodes - 1)):
        b.new_round()
        if n_nodes == 1:
            continue
        recv_at = 0
        for j in own:
            off, n = lanes[j]
            ring = [owner(node, j) for node in nodes]
            right, left = ring[(node_index + 1) % n_nodes], ring[(node_index - 1) % n_nodes]
            pieces = chunk_bounds(n, n_nodes)
            if step < n_nodes - 1:  # reduce-scatter over nodes
                send_p, recv_p = (node_index - step) % n_nodes, (node_index - step - 1) % n_nodes
                po, pn = pieces[send_p]
                b.send(right, Range("output", off + po, pn))
                po, pn = pieces[recv_p]
                b.recv(left, Range("scratch", recv_at, pn))
                b.reduce(Range("output", off + po, pn), Range("output", off + po, pn), Range("scratch", recv_at, pn))
                recv_at += pn
            else:  # all-gather over nodes
                g = step - (n_nodes - 1)
                po, pn = pieces[(node_index + 1 - g) % n_nodes]
                b.send(right, Range("output", off + po, pn))
                po, pn = pieces[(node_index - g) % n_nodes]
                b.recv(left, Range("output", off + po, pn))
    # Phase 3: owners hand their finished lanes to the rest of the node.
    for s in range(1, lanes_total):
        b.new_round()
        if s >= width:
            continue
        to, frm = mine[(local + s) % width], mine[(local - s) % width]
        for j in own:
            b.send(to, Range("output", *lanes[j]))
        for j in range(lanes_total):
            if owner(mine, j) == frm:
                b.recv(frm, Range("output", *lanes[j]))
    return b.build()
