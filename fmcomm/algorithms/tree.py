"""Double-binary-tree all-reduce (NCCL's): two pipelined trees, each carrying half.

The buffer is cut in two halves (``chunk_bounds(count, 2)``); half t travels on tree t.
The two trees (``double_binary_tree``) are chosen so that every rank is interior in at
most one of them and a leaf in the other, so no rank forwards more than one half and
the two halves share the links evenly.

Each half is cut into ``chunks`` pipeline chunks, and on each tree:

1. Reduce toward the root. A leaf sends its input chunk to its parent; an interior
   node receives the chunk from each child into scratch, reduces it with its own input
   into its output (operands in tree order: left subtree, itself, right subtree) and
   sends the partial up. Chunk c leaves depth d in round c + D - d (D the depth of the
   tree), so every chunk climbs one level per round and chunk c+1 follows one round
   behind: each link carries one chunk per round while the pipe is full.
2. Broadcast down. The root's chunk c is final at the end of round c + D - 1; it goes
   down one level per round, crossing into depth d in round c + D + d - 1, straight
   into the output. Which chunk crosses each tree edge in each round (D = 2, 3 chunks;
   the root is depth 0)::

       edge                 round:  0    1    2    3    4    5
       depth 2 -> 1  (up, reduce)   c0   c1   c2   .    .    .
       depth 1 -> 0  (up, reduce)   .    c0   c1   c2   .    .
       depth 0 -> 1  (down)         .    .    c0   c1   c2   .
       depth 1 -> 2  (down)         .    .    .    c0   c1   c2

   In round 2 the edge between depths 1 and 0 carries c1 up and c0 down at once: the
   broadcast of early chunks overlaps the reduce of later ones.

Each element is reduced by one fixed set of nodes in one fixed order, then copied, so
all ranks end with the same bytes. The two trees run in the same rounds; a rank's
steps for tree 0 come before its steps for tree 1 in every round, so messages
between one pair of ranks are posted in the same order on both ends.

Rounds: chunks + 2D - 1, with D = floor(lg p). Scratch: one chunk per child (at most
two chunks, ceil(ceil(n/2)/chunks) elements each).

Bytes sent per rank (n bytes): half h_t = n/2 of tree t goes once over each tree edge
in each direction, so a rank sends h_t to its parent (unless root) and h_t to each
child. A rank that is a leaf in one tree and interior in the other sends at most
h + 3h = 2n (4·ceil(n/2) elements counting rounding); all ranks together send exactly
2(p-1)n, i.e. 2((p-1)/p)n per rank on average, as ring.

Cost (one port, p ranks, n bytes, C = chunks): every round a rank sends at most 4
messages of n/(2C) bytes and reduces at most two, so
(C + 2 lg p - 1)·(α + (2n/C)·β + (n/C)·γ)
= (C + 2 lg p - 1)·α + (1 + (2 lg p - 1)/C)·(2nβ + nγ).
With many chunks the bandwidth terms approach ring's while the latency grows with
lg p instead of p; with few chunks it is a plain reduce + broadcast.
"""
from __future__ import annotations

import dataclasses
import functools

from ..schedule import Range, RankSchedule, RoundBuilder, chunk_bounds

#: At most this many pipeline chunks per half (the default for large messages).
PIPELINE_CHUNKS = 8
#: Below this many elements per chunk the pipeline is not worth a round's latency.
MIN_CHUNK_ELEMENTS = 16384


def default_chunks(count: int) -> int:
    """min(PIPELINE_CHUNKS, ceil(half / MIN_CHUNK_ELEMENTS)), at least 1: a message
    under 2·MIN_CHUNK_ELEMENTS elements runs unpipelined; from
    2·PIPELINE_CHUNKS·MIN_CHUNK_ELEMENTS elements (1 MiB of float32) on it uses all 8."""
    half = (count + 1) // 2
    return max(1, min(PIPELINE_CHUNKS, -(-half // MIN_CHUNK_ELEMENTS)))


@dataclasses.dataclass(frozen=True)
class Tree:
    """A rooted tree over ranks 0..p-1; children in tree order (left first)."""
    root: int
    parent: tuple[int, ...]  # -1 at the root
    children: tuple[tuple[int, ...], ...]
    depth: tuple[int, ...]

    @property
    def height(self) -> int:
        return max(self.depth)

    def interior(self) -> set[int]:
        return {r for r, c in enumerate(self.children) if c}


def _bit_tree(n: int) -> dict[int, tuple[int, ...]]:
    """Children of each label 1..n in the in-order binary tree where every range's root
    is its label with the most trailing zero bits (NCCL's btree, less its extra root)."""
    children: dict[int, tuple[int, ...]] = {}

    def build(lo: int, hi: int) -> int | None:
        if lo > hi:
            return None
        t = hi.bit_length()
        while (hi >> t) << t < lo:
            t -= 1
        root = (hi >> t) << t
        children[root] = tuple(c for c in (build(lo, root - 1), build(root + 1, hi)) if c is not None)
        return root

    build(1, n)
    return children


# The in-order bit tree over labels 1..p: odd labels are leaves, even labels interior
# (an even label x always has x-1 in its left subtree). Tree 0 gives rank r label r+1,
# so its interior nodes are the odd ranks. Tree 1 is the same shape relabelled:
#
#   p = 8, even: mirror, rank 7-r           p = 7, odd: shift, rank r+1 (mod 7)
#
#      tree 0          tree 1                 tree 0          tree 1
#         7               0                      3               4
#        /               /                     /   \           /   \
#       3               4                     1     5         2     6
#     /   \           /   \                  / \   / \       / \   / \
#    1     5         6     2                0   2 4   6     1   3 5   0
#   / \   / \       / \   / \
#  0   2 4   6     7   5 3   1            interior: 1 3 5      2 4 6
#
#  interior: 1 3 5 7   0 2 4 6            (rank 0 is a leaf in both)
#
# Mirroring (label p-r) flips the parity of every rank when p is even, so the interior
# sets are the odd and the even ranks. When p is odd, mirroring keeps parity, so tree 1
# shifts instead (label r, and p for rank 0): interior = even ranks from 2, leaves =
# odd ranks and 0. Either way each rank is interior in at most one tree, and both
# trees have depth floor(lg p).

@functools.lru_cache(maxsize=64)
def double_binary_tree(world: int) -> tuple[Tree, Tree]:
    """The two trees of the double binary tree over ``world`` ranks (see the picture)."""
    labels = _bit_tree(world)

    def relabel(rank_of) -> Tree:
        parent = [-1] * world
        kids: list[tuple[int, ...]] = [()] * world
        for lab, cs in labels.items():
            kids[rank_of(lab)] = tuple(rank_of(c) for c in cs)
            for c in cs:
                parent[rank_of(c)] = rank_of(lab)
        root = parent.index(-1)
        depth = [0] * world
        order = [root]
        for r in order:  # breadth first from the root
            for c in kids[r]:
                depth[c] = depth[r] + 1
                order.append(c)
        return Tree(root, tuple(parent), tuple(kids), tuple(depth))

    first = relabel(lambda lab: lab - 1)
    second = relabel((lambda lab: world - lab) if world % 2 == 0 else (lambda lab: lab % world))
    return first, second


def all_reduce(rank: int, world: int, count: int, *, chunks: int | None = None) -> RankSchedule:
    """``chunks``: pipeline chunks per half; default :func:`default_chunks` (count)."""
    b = RoundBuilder(rank)
    if world == 1:
        b.copy(Range("output", 0, count), Range("input", 0, count))
        return b.build()
    n_chunks = default_chunks(count) if chunks is None else chunks
    if n_chunks < 1:
        raise ValueError(f"tree all-reduce needs at least one pipeline chunk, got {n_chunks}")
    trees = double_binary_tree(world)
    height = trees[0].height  # both trees have the same shape
    rounds: list[list] = [[] for _ in range(n_chunks + 2 * height - 1)]
    scratch = 0

    for tree, (half_off, half_len) in zip(trees, chunk_bounds(count, 2)):
        pieces = [(half_off + o, m) for o, m in chunk_bounds(half_len, n_chunks)]
        slot = max(m for _, m in pieces)
        kids, parent, d = tree.children[rank], tree.parent[rank], tree.depth[rank]
        up = height - d  # the round in which chunk 0 leaves this rank upward
        base = scratch  # one scratch slot per child (a rank has children in one tree at most)
        scratch += slot * len(kids)
        for c, (off, m) in enumerate(pieces):
            if not m:
                continue
            mine_in, mine_out = Range("input", off, m), Range("output", off, m)
            if kids:
                r = rounds[c + up - 1]
                landed = [Range("scratch", base + j * slot, m) for j in range(len(kids))]
                for k, dst in zip(kids, landed):
                    r.append(("recv", k, dst))
                # Tree order: left subtree, this rank, right subtree. Every interior node
                # of the bit tree has a left child, which comes first in ``kids``.
                r.append(("reduce", mine_out, landed[0], mine_in))
                for x in landed[1:]:
                    r.append(("reduce", mine_out, mine_out, x))
            if parent >= 0:
                rounds[c + up].append(("send", parent, mine_out if kids else mine_in))
                rounds[c + height + d - 1].append(("recv", parent, mine_out))
            for k in kids:
                rounds[c + height + d].append(("send", k, mine_out))

    b.need_scratch(scratch)
    for r in rounds:
        b.new_round()
        for step in r:
            getattr(b, step[0])(*step[1:])
    return b.build()
