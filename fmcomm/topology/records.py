"""The fixed-size record each rank contributes to topology detection.

Ranks exchange their facts as one row of int64 per rank in a sum all-reduce (each rank
writes only its own row, so the sum of zeros and one row is that row bit for bit).
A row is a ``struct`` record: plain integers and fixed-width UTF-8 names, never a
pickle. :func:`unpack` checks every count and code before it trusts it, and a row that
does not parse is a :class:`~fmcomm.errors.TopologyError` naming the rank.
"""
from __future__ import annotations

import hashlib
import struct

from ..errors import TopologyError
from .gpus import PCIE_CLASSES
from .model import Gpu, Nic, NodeFacts, RankFacts

RECORD_VERSION = 1
MAX_NICS = 8
MAX_GPUS = 16
NAME_BYTES = 32
HOST_BYTES = 64

_HEAD = struct.Struct(f"<Hq{HOST_BYTES}sHHIIhBB")  # version, key, host, sockets, numa, cpus, cores, numa, nics, gpus
_NIC = struct.Struct(f"<{NAME_BYTES}sih")             # name, speed Mb/s, numa node
_GPU = struct.Struct(f"<{NAME_BYTES}sIh")             # name, memory MiB, numa node
_PATHS = MAX_GPUS * MAX_GPUS + MAX_GPUS * MAX_NICS    # one code byte each
RECORD_BYTES = _HEAD.size + MAX_NICS * _NIC.size + MAX_GPUS * _GPU.size + _PATHS
RECORD_WORDS = -(-RECORD_BYTES // 8)                   # int64 words per rank

# Path codes on the wire: 0 none, 1 X, 2.. the PCIe classes, 100 + k for NV<k>.
_CODES = {"X": 1, **{c: 2 + i for i, c in enumerate(PCIE_CLASSES)}}
_NAMES = {v: k for k, v in _CODES.items()}


def name_key(name: str) -> int:
    """62 bits of a stable hash of a node name: positive, so a sum with zeros is exact."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 2


def _fixed(text: str, width: int) -> bytes:
    raw = text.encode()[:width]
    while True:  # never cut a character in half
        try:
            raw.decode()
            return raw
        except UnicodeDecodeError:
            raw = raw[:-1]


def _path_code(path: str) -> int:
    if path.startswith("NV"):
        return 100 + min(int(path[2:]), 155)
    return _CODES[path]


def pack(key: int, node: NodeFacts, rank: RankFacts) -> bytes:
    """This rank's record, RECORD_WORDS * 8 bytes."""
    nics, gpus = node.nics[:MAX_NICS], node.gpus[:MAX_GPUS]
    out = bytearray(_HEAD.pack(RECORD_VERSION, key, _fixed(node.hostname, HOST_BYTES), min(node.sockets, 65535),
                               min(node.numa_nodes, 65535), node.cpus, rank.cores, rank.numa_node,
                               len(nics), len(gpus)))
    for i in range(MAX_NICS):
        n = nics[i] if i < len(nics) else Nic("", 0, 0)
        out += _NIC.pack(_fixed(n.name, NAME_BYTES), n.speed_mbps, n.numa_node)
    for i in range(MAX_GPUS):
        g = gpus[i] if i < len(gpus) else Gpu(0, "", 0, 0)
        out += _GPU.pack(_fixed(g.name, NAME_BYTES), g.memory_mib, g.numa_node)
    codes = bytearray(_PATHS)
    for i, row in enumerate(node.gpu_paths[:MAX_GPUS]):
        for j, p in enumerate(row[:MAX_GPUS]):
            codes[i * MAX_GPUS + j] = _path_code(p)
    base = MAX_GPUS * MAX_GPUS
    for i, row in enumerate(node.gpu_nic_paths[:MAX_GPUS]):
        for k, p in enumerate(row[:MAX_NICS]):
            codes[base + i * MAX_NICS + k] = _path_code(p)
    out += codes
    out += bytes(RECORD_WORDS * 8 - len(out))
    return bytes(out)


def _name(raw: bytes, rank: int) -> str:
    try:
        return raw.rstrip(b"\0").decode()
    except UnicodeDecodeError:
        raise TopologyError(f"topology record of rank {rank}: a name is not UTF-8") from None


def _decode_path(code: int, rank: int) -> str:
    if code >= 100:
        return f"NV{code - 100}"
    if code in _NAMES:
        return _NAMES[code]
    raise TopologyError(f"topology record of rank {rank}: unknown path code {code}")


def unpack(record: bytes, rank: int) -> tuple[int, NodeFacts, RankFacts]:
    """(node key, node facts, rank facts) from ``rank``'s record, every field checked."""
    if len(record) != RECORD_WORDS * 8:
        raise TopologyError(f"topology record of rank {rank}: {len(record)} bytes, expected {RECORD_WORDS * 8}")
    (version, key, host, n_sockets, n_numa, cpus, cores, numa, n_nics, n_gpus) = _HEAD.unpack_from(record, 0)
    if version != RECORD_VERSION:
        raise TopologyError(f"topology record of rank {rank}: version {version}, this fmcomm reads "
                            f"{RECORD_VERSION} (ranks run different fmcomm versions?)")
    if key < 0 or n_nics > MAX_NICS or n_gpus > MAX_GPUS or numa < -1:
        raise TopologyError(f"topology record of rank {rank}: out-of-range field (key {key}, {n_nics} NICs, "
                            f"{n_gpus} GPUs, NUMA node {numa})")
    at = _HEAD.size
    nics = []
    for i in range(MAX_NICS):
        name, speed, nic_numa = _NIC.unpack_from(record, at)
        at += _NIC.size
        if i < n_nics:
            nics.append(Nic(_name(name, rank), speed if speed > 0 else -1, max(nic_numa, -1)))
    gpus = []
    for i in range(MAX_GPUS):
        name, mem, gpu_numa = _GPU.unpack_from(record, at)
        at += _GPU.size
        if i < n_gpus:
            gpus.append(Gpu(i, _name(name, rank), mem, max(gpu_numa, -1)))
    codes = record[at:at + _PATHS]
    paths = tuple(tuple(_decode_path(codes[i * MAX_GPUS + j], rank) for j in range(n_gpus)) for i in range(n_gpus))
    base = MAX_GPUS * MAX_GPUS
    gpu_nic = tuple(tuple(_decode_path(codes[base + i * MAX_NICS + k], rank) for k in range(n_nics))
                    for i in range(n_gpus)) if n_nics else ()
    node = NodeFacts(hostname=_name(host, rank), sockets=n_sockets, numa_nodes=n_numa, cpus=cpus,
                     nics=tuple(nics), gpus=tuple(gpus), gpu_paths=paths, gpu_nic_paths=gpu_nic)
    return key, node, RankFacts(cores=cores, numa_node=numa)
