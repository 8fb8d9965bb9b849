"""The compressed all-reduce as a plan of phases over topology levels.

One description, read by both sides: the executor (``fmcomm/compressed.py``) takes
from it whether the call runs on two levels, over which groups, and in which pieces,
and names each phase it times after it; the cost model (``fmcomm.tuning.plans``)
prices the same phases. A pure function of the ranks' nodes, the compressor and the
element count.

Two levels (``NAME@inter`` where the ranks span two or more nodes of equal size),
for each piece of the tensor (``PIECE_ELEMENTS`` per local rank; the lane phases of
piece q overlap the node phases of pieces q+1 and q-1):

1. ``intra_reduce_scatter`` over the node, full precision: each local rank keeps one
   shard of the piece (its lane);
2. ``encode``, ``exchange``, ``reduce_and_encode``, ``gather`` over the lane (the
   ranks with this local index on every node): each rank codes the lane's chunks it
   does not own and sends each to its owner, owners add them to their own values
   and code the sum, and every owner's sum goes to the whole lane;
3. ``intra_all_gather`` over the node of the lanes' coded sums, and ``decode`` of
   every shard by every rank.

One level (no ``@inter``, one node, or nodes of unequal size): phases 2 and
``decode`` over the whole group, the tensor in one piece.
"""
from __future__ import annotations

import dataclasses

# Elements per local rank in one piece of the two-level path: big enough that a
# piece's fixed costs (node barriers, lane round trips) stay small, small enough that
# a 64 MiB tensor makes several pieces to overlap.
PIECE_ELEMENTS = 4 << 20

Group = str  # "node", "lane" or "group"


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    group: Group   # the ranks it runs over ("self": this rank alone)
    coded: bool    # whether what it moves is coded payloads (False: full precision, or nothing)


LANE_PHASES = (Phase("encode", "self", False), Phase("exchange", "lane", True),
               Phase("reduce_and_encode", "self", False), Phase("gather", "lane", True))
TWO_LEVEL = (Phase("intra_reduce_scatter", "node", False),) + LANE_PHASES + (
    Phase("intra_all_gather", "node", True), Phase("decode", "self", False))
ONE_LEVEL = tuple(dataclasses.replace(p, group="group") if p.group == "lane" else p for p in LANE_PHASES) + (
    Phase("decode", "self", False),)


@dataclasses.dataclass(frozen=True)
class CompressedPlan:
    two_level: bool
    nodes: int                              # nodes the lanes cross (1 where one level)
    ranks_per_node: int                     # local ranks (1 where one level)
    lane_width: int                         # ranks exchanging coded chunks: a lane, or the group
    pieces: tuple[tuple[int, int, int], ...]  # (offset, count, shard per local rank)
    phases: tuple[Phase, ...]

    @property
    def phase_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.phases)


def pieces(n: int, local: int) -> tuple[tuple[int, int, int], ...]:
    """(offset, count, shard) of each piece: ``count`` values of the tensor, ``shard`` per local rank."""
    step = PIECE_ELEMENTS * local
    return tuple((o, min(step, n - o), -(-min(step, n - o) // local)) for o in range(0, n, step))


def equal_nodes(node_of) -> tuple[int, int] | None:
    """(nodes, ranks per node) where the ranks span two or more nodes of equal size, else None."""
    counts: dict[int, int] = {}
    for n in node_of:
        counts[n] = counts.get(n, 0) + 1
    sizes = set(counts.values())
    if len(counts) < 2 or len(sizes) != 1:
        return None
    return len(counts), sizes.pop()


def plan(node_of, inter: bool, n: int) -> CompressedPlan:
    """The plan of a compressed all-reduce of ``n`` elements over ranks on ``node_of``;
    ``inter``: the spec asks for ``@inter`` (compress between nodes only)."""
    world = len(node_of)
    split = equal_nodes(node_of) if inter else None
    if split is None:
        return CompressedPlan(False, 1, 1, world, ((0, n, n),) if n else (), ONE_LEVEL)
    nodes, local = split
    return CompressedPlan(True, nodes, local, nodes, pieces(n, local), TWO_LEVEL)
