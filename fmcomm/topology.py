"""Where ranks are: which node each rank runs on.

A node is a host: ranks on one node share memory and a fast link, ranks on
different nodes talk over the network. Membership comes from the hostname, or from
``FMCOMM_NODE_ID`` where hostnames do not tell nodes apart (containers sharing a
name, or namespaces emulating several nodes on one box without their own UTS
namespace). Every rank learns every rank's node through one small all-reduce of
hashed names — fixed-size integers on the wire, nothing unpickled.
"""
from __future__ import annotations

import dataclasses
import hashlib
import socket

import torch

from .dtypes import DTYPES
from .transport.base import Transport


def node_name(configured: str) -> str:
    return configured or socket.gethostname()


def _name_key(name: str) -> int:
    # 62 bits of a stable hash, positive so that summing zeros and one key is exact.
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 2


@dataclasses.dataclass(frozen=True)
class Topology:
    node_of: tuple[int, ...]  # node index of each rank, nodes numbered by their lowest rank

    @property
    def nodes(self) -> int:
        return len(set(self.node_of))

    def ranks_on(self, node: int) -> tuple[int, ...]:
        return tuple(r for r, n in enumerate(self.node_of) if n == node)

    def local_rank(self, rank: int) -> int:
        return self.ranks_on(self.node_of[rank]).index(rank)

    @classmethod
    def from_keys(cls, keys: list[int]) -> "Topology":
        index: dict[int, int] = {}
        return cls(tuple(index.setdefault(k, len(index)) for k in keys))


def detect(transport: Transport, configured_node_id: str, timeout: float) -> Topology:
    """Gather every rank's node key; a collective over ``transport``."""
    import time

    world, rank = transport.world, transport.rank
    keys = torch.zeros(world, dtype=torch.int64)
    keys[rank] = _name_key(node_name(configured_node_id))
    if world > 1:
        req = transport.native_all_reduce(keys, keys, DTYPES["int64"], "sum")
        if not transport.wait([req], time.monotonic() + timeout):
            from .errors import CommTimeoutError
            raise CommTimeoutError("topology detection: not every rank joined within the timeout",
                                   rank=rank, op="topology")
    return Topology.from_keys(keys.tolist())
