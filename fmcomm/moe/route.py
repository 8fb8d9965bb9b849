"""How the rows travel: a route is a list of steps, run forward by dispatch and backward by combine.

A step is either a permutation of the rows (``Permute``: new = old[index]) or an uneven
all-to-all on some communicator (``Exchange``: rows in blocks of ``send`` sizes go out,
blocks of ``recv`` sizes come in, in peer order). Running the steps in reverse order,
each permutation inverted and each exchange with its sizes swapped, takes rows back
where they came from, which is all combine (and the backward of dispatch) needs.

``direct``: one exchange over the whole group. Either route delivers the rows grouped
by source rank, each source's rows by local expert; dispatch then regroups them by
local expert (``expert_grouping``).

Heads: dispatch's forward run carries, in front of each source's rows for a
destination, that source's row count for each of the destination's local experts
(int32, in as many rows of the row's dtype as they fill; ``heads.py``), so the
destination learns them with the tokens instead of in a second round of counts. The
route of that run is built from the rows matrix plus the head rows; the route kept for
combine and the backward passes, from the rows matrix alone.

``hierarchical`` (Tutel's 2DH; DeepSpeed-MoE's hierarchical all-to-all): N nodes of L
ranks; rank (a, l) is local rank l of node a. Step 1, inside each node: every rank hands
local rank l' all its rows for ranks of local index l' on any node, so afterwards rank
(a, l') holds everything node a sends to lane l'. Step 2, across nodes among the ranks of
one local index (a lane): (a, l') sends (b, l') everything node a has for it, one message
per node pair instead of one per rank pair, L times larger. That rank is the rows'
destination, so the scatter inside the destination node that a three-step form would
need is already done by step 1's choice of lane. Per rank, N − 1 messages cross
between nodes instead of N·L − L (the α saving); each row still crosses once, and
each row makes one hop inside its source node (the price).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..algorithms.hierarchical import group_by_node
from ..dtypes import dtype_of
from ..runtime.executor import arguments_agreed


@dataclasses.dataclass
class Permute:
    index: torch.Tensor  # new = old[index]
    _inverse: "Permute | None" = None

    def inverse(self) -> "Permute":
        # Combine and both backward passes run the route backward: invert once.
        if self._inverse is None:
            inverse_index = torch.empty_like(self.index)
            inverse_index[self.index] = torch.arange(self.index.numel())
            self._inverse = Permute(inverse_index, self)
        return self._inverse


@dataclasses.dataclass
class Exchange:
    group: object  # a Communicator
    rows: list[list[int]]  # rows[i][j]: rows group rank i sends group rank j (every member knows all)

    @property
    def send(self) -> list[int]:
        return self.rows[self.group.rank]

    @property
    def recv(self) -> list[int]:
        return [row[self.group.rank] for row in self.rows]

    def reversed(self) -> "Exchange":
        return Exchange(self.group, [list(col) for col in zip(*self.rows)])


def block_permutation(sizes: dict, current: list, wanted: list) -> torch.Tensor:
    """Index that reorders blocks laid out in ``current`` key order into ``wanted`` order."""
    offsets, at = {}, 0
    for key in current:
        offsets[key] = at
        at += sizes[key]
    parts = [torch.arange(offsets[k], offsets[k] + sizes[k]) for k in wanted]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def expert_grouping(received_per_expert: torch.Tensor) -> Permute:
    """Rows grouped by source (each by local expert) → grouped by local expert (sources in order)."""
    world, local = received_per_expert.shape
    experts = torch.arange(local).repeat(world)
    expert_of_row = torch.repeat_interleave(experts, received_per_expert.reshape(-1))
    return Permute(torch.argsort(expert_of_row, stable=True))


def to_sources(comm, m: list[list[int]], algo: str, levels=None) -> list:
    """Steps that take rows sorted by destination to their destinations, grouped there by source rank.

    ``m[s][d]``: rows rank s sends rank d."""
    if algo == "direct":
        return [Exchange(comm, m)]
    node_group, lane_group = levels
    me = comm.rank
    nodes = group_by_node(tuple(comm.topology.node_of))
    node_of_rank = {r: b for b, members in enumerate(nodes) for r in members}
    a, local = node_of_rank[me], nodes[node_of_rank[me]].index(me)
    n_nodes, per_node = len(nodes), len(nodes[0])
    my_node = nodes[a]
    lanes, node_indices = range(per_node), range(n_nodes)

    # Step 1, inside node a: local rank lq hands local rank lp its rows for lane lp of every node.
    step1 = Exchange(node_group, [[sum(m[my_node[lq]][nodes[b][lp]] for b in node_indices) for lp in lanes]
                                  for lq in lanes])
    to_lane_order = [nodes[b][lp] for lp in lanes for b in node_indices]
    step1_permute = Permute(block_permutation({d: m[me][d] for d in range(comm.world)}, list(range(comm.world)),
                                              to_lane_order))
    # Held after step 1: for each source local rank lq, for each node b, the rows (a, lq)
    # sends (b, local). Step 2 sends them on by destination node, along this lane.
    held = {(lq, b): m[my_node[lq]][nodes[b][local]] for lq in lanes for b in node_indices}
    step2_permute = Permute(block_permutation(held, [(lq, b) for lq in lanes for b in node_indices],
                                              [(lq, b) for b in node_indices for lq in lanes]))
    step2 = Exchange(lane_group, [[sum(m[nodes[b_from][lq]][nodes[b_to][local]] for lq in lanes)
                                   for b_to in node_indices] for b_from in node_indices])
    # Arrived: for each source node b, for each of its local ranks, the rows it sends me;
    # sources into rank order, as direct delivers them.
    arrived = {nodes[b][lq]: m[nodes[b][lq]][me] for b in node_indices for lq in lanes}
    to_rank_order = Permute(block_permutation(arrived, [nodes[b][lq] for b in node_indices for lq in lanes],
                                              list(range(comm.world))))
    return [step1_permute, step1, step2_permute, step2, to_rank_order]


def run(steps: list, rows: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """Move ``rows`` along the route (``backward``: from its end back to its start).

    Every member of each exchange already knows every member's counts (the dispatch's
    agreement), so each exchange is one engine call with nothing agreed before it.
    """
    if backward:
        steps = [s.inverse() if isinstance(s, Permute) else s.reversed() for s in reversed(steps)]
    width = math.prod(rows.shape[1:])
    for step in steps:
        if isinstance(step, Permute):
            rows = rows[step.index]
        else:
            out = rows.new_empty((sum(step.recv),) + tuple(rows.shape[1:]))
            counts = [[n * width for n in row] for row in step.rows]
            with arguments_agreed():
                step.group._all_to_all_counts(out.view(-1), rows.contiguous().view(-1), dtype_of(rows.dtype), counts,
                                              None, False)
            rows = out
    return rows
