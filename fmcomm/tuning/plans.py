"""Pricing the compressed all-reduce's plan of phases.

The plan (:mod:`fmcomm.algorithms.compressed_plan`) says which phases run over which
groups; ``fmcomm/compressed.py`` runs them and this module prices them, phase by
phase, as messages and local work. For ``NAME@inter`` on N equal nodes of L ranks and
n float32 elements:

1. ``intra reduce-scatter``: the registered ring reduce-scatter over each node's L
   ranks at full precision (each rank keeps a lane of n/L).
2. ``coded exchange``: each rank encodes its lane's N-1 foreign chunks (n/(LN) each)
   and sends each to its owner, the rank of the same local index on that node: one
   round, N-1 payloads out and N-1 in per rank, all L lanes of a node at once over its
   link. Each owner decodes and adds them, then encodes its chunk's sum.
3. ``sum all-gather``: each owner sends its sum's payload to the N-1 others of its lane
   in one round.
4. ``intra all-gather``: each rank's lane payloads (N of them) go to the node's other
   ranks: the registered ring all-gather over L ranks, in payload bytes.
5. ``decode``: every rank decodes all n elements.

Without ``@inter``, or on one node, the whole group is one lane: steps 2, 3 and 5 over
p ranks with chunks of n/p.

Payload sizes come from the compressor itself (``Compressor.payload_bytes``). Encode
and decode are priced at the machine's codec rates (``Topology.codecs``, float32
bytes per second), reductions at its reduce rate.

What the description leaves out: the executor pipelines the ``@inter`` path piece by
piece (each piece's lane steps overlap the next piece's intra-node step), and the
two intra-node steps may go through /dev/shm instead of the transport. The plan
prices the phases one after another, so it overestimates where pipelining hides
time.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..algorithms import all_gather as all_gather_algos
from ..algorithms import compressed_plan
from ..algorithms import reduce_scatter as reduce_scatter_algos
from ..compression import parse
from ..errors import InvalidArgument
from ..topology.model import Topology
from .cost import BUSBW_FACTOR, Estimate, Light, Representatives, join, lighten, profile

FLOAT32 = 4


def _shift_rounds(light: Light, by: int, rounds: int) -> Light:
    return dataclasses.replace(light, m_round=light.m_round + by, w_round=light.w_round + by, rounds=rounds)


def _messages(rank: int, rnd: int, peers: list[int], nbytes: int) -> Light:
    """One round in which ``rank`` sends ``nbytes`` to each of ``peers`` and receives as much from each."""
    k = len(peers)
    ints = lambda v: np.full(2 * k, v, dtype=np.int64)  # noqa: E731
    empty = np.zeros(0, dtype=np.int64)
    return Light(ints(rnd), ints(rank), np.array(peers + peers, dtype=np.int64), ints(nbytes),
                 np.array([0] * k + [1] * k, dtype=np.int64), empty, empty, empty, empty, rnd + 1)


def _local(schedule, rank_map: list[int], scale: int) -> Light:
    """A sub-group's schedule as global ranks, counts in bytes (``scale`` bytes an element)."""
    light = lighten(schedule)
    mapped = np.asarray(rank_map, dtype=np.int64)
    return dataclasses.replace(light, m_rank=mapped[light.m_rank], m_peer=mapped[light.m_peer],
                               m_count=light.m_count * scale, w_rank=mapped[light.w_rank],
                               w_reduced=light.w_reduced * scale, w_copied=light.w_copied * scale)


def price_compressed_all_reduce(topo: Topology, nbytes: int, compress: str) -> Estimate:
    """Predicted time of ``all_reduce(..., compress=compress)`` of ``nbytes`` of float32 on ``topo``.

    Phase by phase of the plan the executor runs (:func:`fmcomm.algorithms.compressed_plan.plan`),
    one after another: pieces and their overlap are left out (see the module docstring).
    """
    spec = parse(compress)
    if not spec.enabled:
        raise InvalidArgument(f"compress={compress!r} compresses nothing; price the schedules instead")
    comp, rates = spec.compressor, topo.codec(spec.family)
    n = nbytes // FLOAT32
    layout = compressed_plan.plan(topo.node_of, spec.level == "inter", n)
    inter, per, nodes = layout.two_level, layout.ranks_per_node, layout.nodes
    lanes, width = (per, nodes) if inter else (1, topo.world)  # lanes per node, ranks on a lane
    lane_ranks = (lambda local: [node * per + local for node in range(nodes)]) if inter else \
        (lambda local: list(range(topo.world)))
    # Every node is alike (equal nodes, every lane the same), so node 0's ranks stand for all:
    # their sends and receives load every port and link of node 0.
    members = list(topo.groups()[0])
    chunk = n // (lanes * width)
    payload = comp.payload_bytes(chunk)
    encode, decode = rates.encode.value, rates.decode.value
    parts: list[Light] = []
    local_work = [0.0]  # seconds of coding work, every rank alike (the reductions are priced by the profile)

    def intra_reduce_scatter(rnd: int) -> int:
        for local in members:
            parts.append(_shift_rounds(_local(reduce_scatter_algos.ring(local, per, n // per), members, FLOAT32),
                                       rnd, 0))
        return per - 1

    def lane_round(rnd: int) -> int:  # exchange, and gather: one payload to each other rank of the lane
        for me in members:
            lane = lane_ranks(me % per if inter else 0)
            parts.append(_messages(me, rnd, [r for r in lane if r != me], payload))
        return 1

    def local(seconds: float):
        def run(rnd: int) -> int:
            local_work[0] += seconds  # no messages: no round of its own
            return 0
        return run

    def intra_all_gather(rnd: int) -> int:
        for local_rank in members:
            parts.append(_shift_rounds(_local(all_gather_algos.ring(local_rank, per, width * payload), members, 1),
                                       rnd, 0))
        return len(all_gather_algos.ring(0, per, width * payload).rounds)

    foreign = (width - 1) * chunk * FLOAT32
    pricers = {"intra_reduce_scatter": intra_reduce_scatter,
               "encode": local(foreign / encode),
               "exchange": lane_round,
               "reduce_and_encode": local(foreign / decode + chunk * FLOAT32 / encode),
               "gather": lane_round,
               "intra_all_gather": intra_all_gather,
               "decode": local(n * FLOAT32 / decode)}
    rnd = 0
    for phase in layout.phases:
        rnd += pricers[phase.name](rnd)
    light = dataclasses.replace(join(parts), rounds=max(rnd, 1))
    reps = Representatives(light, f"plan of phases for {spec.text} (fmcomm.algorithms.compressed_plan)", True)
    prof = profile(reps, topo)
    seconds = prof.seconds(1) + local_work[0]
    busbw = nbytes / seconds * BUSBW_FACTOR["all_reduce"](topo.world) if seconds > 0 else 0.0
    return Estimate("all_reduce", spec.text, nbytes, seconds, busbw, reps.method, True)
