"""How the rows travel: a route is a list of steps, run forward by dispatch and backward by combine.

A step is either a permutation of the rows (``Permute``: new = old[index]) or an uneven
all-to-all on some communicator (``Exchange``: rows in blocks of ``send`` sizes go out,
blocks of ``recv`` sizes come in, in peer order). Running the steps in reverse order,
each permutation inverted and each exchange with its sizes swapped, takes rows back
where they came from, which is all combine (and the backward of dispatch) needs.

``direct``: one exchange over the whole group, then the received rows (grouped by
source rank, each source's rows by local expert) are regrouped by local expert.

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

import torch

from ..algorithms.hierarchical import group_by_node


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
    send: list[int]
    recv: list[int]

    def reversed(self) -> "Exchange":
        return Exchange(self.group, self.recv, self.send)


def block_permutation(sizes: dict, current: list, wanted: list) -> torch.Tensor:
    """Index that reorders blocks laid out in ``current`` key order into ``wanted`` order."""
    offsets, at = {}, 0
    for key in current:
        offsets[key] = at
        at += sizes[key]
    parts = [torch.arange(offsets[k], offsets[k] + sizes[k]) for k in wanted]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def expert_grouping(layout) -> Permute:
    """Rows received grouped by source (each by local expert) → grouped by local expert (sources in order)."""
    experts = torch.arange(layout.experts_per_rank).repeat(layout.world)
    expert_of_row = torch.repeat_interleave(experts, layout.received_per_expert.reshape(-1))
    return Permute(torch.argsort(expert_of_row, stable=True))


def direct_route(comm, layout) -> list:
    return [Exchange(comm, layout.sent_rows, layout.received_rows), expert_grouping(layout)]


def hierarchical_route(comm, layout, node_group, lane_group) -> list:
    """The two-step route described in the module docstring (every rank derives it from the rows matrix)."""
    m, me = layout.rows_matrix, comm.rank
    nodes = group_by_node(tuple(comm.topology.node_of))
    node_of_rank = {r: b for b, members in enumerate(nodes) for r in members}
    a, local = node_of_rank[me], nodes[node_of_rank[me]].index(me)
    n_nodes, per_node = len(nodes), len(nodes[0])
    my_node = nodes[a]

    # Step 1: my rows, sorted by destination rank, regrouped by (destination's local index, its node).
    by_rank = {d: m[me][d] for d in range(comm.world)}
    to_lane_order = [nodes[b][lp] for lp in range(per_node) for b in range(n_nodes)]
    step1_permute = Permute(block_permutation(by_rank, list(range(comm.world)), to_lane_order))
    step1 = Exchange(node_group,
                     [sum(m[me][nodes[b][lp]] for b in range(n_nodes)) for lp in range(per_node)],
                     [sum(m[my_node[lq]][nodes[b][local]] for b in range(n_nodes)) for lq in range(per_node)])
    # Received: for each source local rank lq, for each destination node b, the rows
    # (a, lq) sends (b, local). Step 2 sends them by destination node.
    held = {(lq, b): m[my_node[lq]][nodes[b][local]] for lq in range(per_node) for b in range(n_nodes)}
    step2_permute = Permute(block_permutation(
        held, [(lq, b) for lq in range(per_node) for b in range(n_nodes)],
        [(lq, b) for b in range(n_nodes) for lq in range(per_node)]))
    step2 = Exchange(lane_group,
                     [sum(held[(lq, b)] for lq in range(per_node)) for b in range(n_nodes)],
                     [sum(m[nodes[b][lq]][me] for lq in range(per_node)) for b in range(n_nodes)])
    # Received: for each source node b, for each of its local ranks lq, the rows (b, lq)
    # sends me; put the sources in rank order as direct delivers them, then by expert.
    arrived = {nodes[b][lq]: m[nodes[b][lq]][me] for b in range(n_nodes) for lq in range(per_node)}
    to_rank_order = block_permutation(arrived, [nodes[b][lq] for b in range(n_nodes) for lq in range(per_node)],
                                      list(range(comm.world)))
    by_expert = expert_grouping(layout).index
    return [step1_permute, step1, step2_permute, step2, Permute(to_rank_order[by_expert])]


def run(steps: list, rows: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """Move ``rows`` along the route (``backward``: from its end back to its start)."""
    if backward:
        steps = [s.inverse() if isinstance(s, Permute) else s.reversed() for s in reversed(steps)]
    for step in steps:
        if isinstance(step, Permute):
            rows = rows[step.index]
        else:
            out = rows.new_empty((sum(step.recv),) + tuple(rows.shape[1:]))
            step.group.all_to_all_single(out, rows.contiguous(), step.recv, step.send)
            rows = out
    return rows

