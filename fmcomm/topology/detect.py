"""Detection: every rank reads its own node, then all ranks exchange fixed-size records.

One sum all-reduce of a world x RECORD_WORDS int64 table (each rank fills its row)
gives every rank every rank's record; nothing from a peer is unpickled, and every
record is checked field by field (``records.unpack``). Node membership comes from the
node name (``FMCOMM_NODE_ID``, else the hostname), so emulated nodes that have their
own hostnames are separate nodes, and ranks that share a hostname share a node.

With ``FMCOMM_TOPO_FILE`` set, the machine file stands in for what this machine cannot
say about itself: its figures (α/β per level, kernel rates) and, where it describes as
many nodes as the job has, its node facts (sysfs and NVML are then not read). Which
rank is on which node is still exchanged, since only the running job knows that.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

from ..dtypes import DTYPES
from ..errors import CommTimeoutError
from ..transport.base import Transport
from . import local, machine_file, records
from .model import NodeFacts, Topology


def topo_file_setting() -> str:
    """The FMCOMM_TOPO_FILE setting, through the one configuration object."""
    from ..config import Config
    return Config.from_env().topo_file


def gather_records(transport: Transport, record: bytes, timeout: float) -> list[bytes]:
    """Every rank's record, in rank order; a collective over ``transport``."""
    world, rank = transport.world, transport.rank
    table = torch.zeros(world, records.RECORD_WORDS, dtype=torch.int64)
    table[rank] = torch.frombuffer(bytearray(record), dtype=torch.int64)
    if world > 1:
        req = transport.native_all_reduce(table, table, DTYPES["int64"], "sum")
        if not transport.wait([req], time.monotonic() + timeout):
            raise CommTimeoutError("topology detection: not every rank joined within the timeout",
                                   rank=rank, op="topology")
    raw = table.numpy().tobytes()
    size = records.RECORD_WORDS * 8
    return [raw[r * size:(r + 1) * size] for r in range(world)]


def assemble(rows: list[tuple[int, NodeFacts, "records.RankFacts"]]) -> Topology:
    """A Topology from every rank's unpacked record."""
    topo = Topology.from_keys([key for key, _, _ in rows])
    first = {}
    for r, (_, node, _) in enumerate(rows):
        first.setdefault(topo.node_of[r], node)
    return Topology(topo.node_of, node_facts=tuple(first[n] for n in range(topo.nodes)),
                    rank_facts=tuple(rank for _, _, rank in rows))


@functools.lru_cache(maxsize=8)
def _node_facts(name: str, sysfs: str) -> NodeFacts:
    """This node's facts, read once per process: every communicator (sub-groups too)
    detects, and NVML's start-up on a GPU machine is not free. NodeFacts is frozen."""
    return local.node_facts(name, Path(sysfs))


def detect(transport: Transport, configured_node_id: str, timeout: float, topo_file: str | None = None,
           sysfs: Path = local.SYSFS) -> Topology:
    """This job's topology, the same on every rank; a collective over ``transport``.

    ``topo_file``: a machine file to take figures (and node facts) from; None reads
    FMCOMM_TOPO_FILE, "" means none.
    """
    path = topo_file_setting() if topo_file is None else topo_file
    loaded = machine_file.load(path) if path else None  # every rank fails alike, before the collective
    name = local.node_name(configured_node_id)
    # A file describing one kind of node describes every node: no need to read this one.
    uniform = loaded is not None and len(set(loaded.node_facts)) == 1
    node = NodeFacts(hostname=name) if uniform else _node_facts(name, str(sysfs))
    record = records.pack(records.name_key(name), node, local.rank_facts(sysfs))
    rows = [records.unpack(raw, r) for r, raw in enumerate(gather_records(transport, record, timeout))]
    topo = assemble(rows)
    if loaded is None:
        return topo
    facts = topo.node_facts
    if uniform:
        facts = loaded.node_facts[:1] * topo.nodes
    elif loaded.node_facts and loaded.nodes == topo.nodes:
        facts = loaded.node_facts
    return Topology(topo.node_of, node_facts=facts, rank_facts=topo.rank_facts, levels=loaded.levels,
                    kernels=loaded.kernels, name=loaded.name or os.path.basename(path),
                    description=loaded.description)
