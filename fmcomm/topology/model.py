"""What fmcomm knows about a machine: the types of a topology.

Terms:

- **node**: a host. Ranks on one node share memory and a fast link; ranks on different
  nodes talk over the network.
- **level**: a class of link a message can cross. ``intra`` joins two ranks of one node
  (shared memory, NVLink), ``inter`` joins ranks of different nodes (the NICs).
- **figure**: one number with the place it came from (:data:`SOURCES`) and a note that
  says how: the sysfs file it was read from, the probe that measured it and how stable
  it was, or the publication a preset took it from.

A level has three figures: ``alpha``, the seconds a message costs before its first
byte arrives; ``bandwidth``, the bytes per second one rank moves alone in one
direction; ``node_bandwidth``, the bytes per second all ranks of one node get
together on that level in one direction, when they use it at once (a node's NICs, or
its memory for shared-memory copies). The cost model divides them among concurrent
flows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Optional

SOURCES = ("detected", "measured", "preset")
LEVELS = ("intra", "inter")


@dataclasses.dataclass(frozen=True)
class Figure:
    value: float
    source: str
    note: str = ""
    # Run-to-run spread of a measured figure: (max - min) / median over the probe's repeats.
    spread: Optional[float] = None

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"figure source {self.source!r} is not one of {', '.join(SOURCES)}")
        if not isinstance(self.value, (int, float)) or math.isnan(self.value):
            raise ValueError(f"figure value {self.value!r} is not a number")


@dataclasses.dataclass(frozen=True)
class Level:
    name: str
    alpha: Figure           # seconds per message
    bandwidth: Figure       # bytes/s, one rank alone, one direction
    node_bandwidth: Figure  # bytes/s, all ranks of a node together, one direction

    def __post_init__(self):
        if self.name not in LEVELS:
            raise ValueError(f"level {self.name!r} is not one of {', '.join(LEVELS)}")
        if self.alpha.value < 0 or self.bandwidth.value <= 0 or self.node_bandwidth.value <= 0:
            raise ValueError(f"level {self.name}: alpha must be >= 0 and bandwidths > 0")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Local work rates, bytes per second of the output they write (one rank)."""
    reduce: Figure  # dst = a + b: reads two bytes, writes one, per byte counted
    copy: Figure


@dataclasses.dataclass(frozen=True)
class CodecRates:
    """A compressor family's kernel rates, float32 bytes per second (4 bytes an element,
    whatever the payload's size): encode (with error feedback, as the compressed
    all-reduce runs it) and decode."""
    family: str
    encode: Figure
    decode: Figure


@dataclasses.dataclass(frozen=True)
class Nic:
    name: str
    speed_mbps: int  # -1: unknown (virtio and other virtual NICs report no speed)
    numa_node: int = -1
    pci_path: str = ""  # the device's sysfs path below /sys/devices, "" for virtual NICs


@dataclasses.dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mib: int
    numa_node: int = -1
    pci_path: str = ""


@dataclasses.dataclass(frozen=True)
class NodeFacts:
    """What detection finds on one node (the facts of its lowest rank)."""
    hostname: str = ""
    sockets: int = 0       # 0: not known
    numa_nodes: int = 0
    cpus: int = 0          # logical CPUs online on the node
    nics: tuple[Nic, ...] = ()
    gpus: tuple[Gpu, ...] = ()
    # gpu_paths[i][j]: how GPU i reaches GPU j ("NV<k>" for k NVLinks, else an NCCL-style
    # PCIe class: PIX, PXB, PHB, NODE, SYS; "X" on the diagonal). Empty without GPUs.
    gpu_paths: tuple[tuple[str, ...], ...] = ()
    # gpu_nic_paths[i][k]: the PCIe class from GPU i to NIC k.
    gpu_nic_paths: tuple[tuple[str, ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class RankFacts:
    cores: int = 0       # logical CPUs this rank may run on (its affinity)
    numa_node: int = -1  # the NUMA node of its first allowed CPU


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where ranks are and what joins them.

    ``node_of[r]`` is rank r's node index; nodes are numbered by their lowest rank.
    The rest is optional: a topology from hostnames alone has only ``node_of``.
    """
    node_of: tuple[int, ...]
    node_facts: tuple[NodeFacts, ...] = ()  # one per node index, when detected or loaded
    rank_facts: tuple[RankFacts, ...] = ()  # one per rank, when detected
    levels: tuple[Level, ...] = ()          # intra and/or inter
    kernels: Optional[Kernels] = None
    codecs: tuple[CodecRates, ...] = ()     # compressor kernel rates, where measured
    name: str = ""                          # the preset or file it came from
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "node_of", tuple(int(n) for n in self.node_of))

    @property
    def world(self) -> int:
        return len(self.node_of)

    @property
    def nodes(self) -> int:
        return len(set(self.node_of))

    def ranks_on(self, node: int) -> tuple[int, ...]:
        return tuple(r for r, n in enumerate(self.node_of) if n == node)

    def local_rank(self, rank: int) -> int:
        return self.ranks_on(self.node_of[rank]).index(rank)

    def fingerprint(self) -> str:
        """A short name for the kind of machine this runs on, keying tuning tables: what
        its nodes have (CPUs, sockets, NICs and their speeds, GPUs and the links between
        them), each kind of node once. Not hostnames, and not how many nodes or ranks a
        job takes: a table's rows say which layouts they hold for, so one table serves
        every job on the machine."""
        kinds = sorted({json.dumps([f.sockets, f.numa_nodes, f.cpus, sorted(x.speed_mbps for x in f.nics),
                                    [[g.name, g.memory_mib] for g in f.gpus], [list(r) for r in f.gpu_paths]])
                        for f in self.node_facts})
        return hashlib.sha256(json.dumps(kinds).encode()).hexdigest()[:16]

    def groups(self) -> list[list[int]]:
        """The ranks of each node, nodes in order of their index, ranks in rank order."""
        return group_by_node(self.node_of)

    def level(self, name: str) -> Level:
        for lv in self.levels:
            if lv.name == name:
                return lv
        from ..errors import TopologyError
        raise TopologyError(f"topology {self.name or '(detected)'} has no figures for the {name} level; "
                            f"load a machine file (FMCOMM_TOPO_FILE), a preset, or run the probes")

    def codec(self, family: str) -> CodecRates:
        for c in self.codecs:
            if c.family == family:
                return c
        from ..errors import TopologyError
        known = ", ".join(c.family for c in self.codecs) or "none"
        raise TopologyError(f"topology {self.name or '(detected)'} has no kernel rates for the {family} compressor "
                            f"(it has: {known}); add them to its machine file from benchmarks/kernels.py")

    def level_between(self, a: int, b: int) -> Level:
        return self.level("intra" if self.node_of[a] == self.node_of[b] else "inter")

    def with_figures(self, levels: tuple[Level, ...] = (), kernels: Optional[Kernels] = None) -> "Topology":
        """This topology with ``levels`` replacing levels of the same name, and ``kernels`` if given."""
        names = {lv.name for lv in levels}
        merged = tuple(lv for lv in self.levels if lv.name not in names) + tuple(levels)
        merged = tuple(sorted(merged, key=lambda lv: LEVELS.index(lv.name)))
        return dataclasses.replace(self, levels=merged, kernels=kernels or self.kernels)

    @classmethod
    def from_keys(cls, keys: list[int]) -> "Topology":
        """Ranks with equal keys share a node; nodes numbered in order of first appearance."""
        index: dict[Any, int] = {}
        return cls(tuple(index.setdefault(k, len(index)) for k in keys))

    @classmethod
    def uniform(cls, nodes: int, ranks_per_node: int, **fields: Any) -> "Topology":
        """``nodes`` nodes of ``ranks_per_node`` ranks each, ranks numbered node by node."""
        if nodes < 1 or ranks_per_node < 1:
            from ..errors import InvalidArgument
            raise InvalidArgument(f"a topology needs at least one node and one rank per node, "
                                  f"got {nodes} x {ranks_per_node}")
        return cls(tuple(r // ranks_per_node for r in range(nodes * ranks_per_node)), **fields)


def group_by_node(node_of: tuple[int, ...]) -> list[list[int]]:
    """The ranks of each node, nodes in order of their index, ranks in rank order."""
    nodes: dict[int, list[int]] = {}
    for r, n in enumerate(node_of):
        nodes.setdefault(n, []).append(r)
    return [nodes[k] for k in sorted(nodes)]
