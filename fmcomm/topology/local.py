"""Facts about the node this process runs on, read from sysfs (and NVML for GPUs).

Every reader takes the sysfs root as an argument so tests can point it at a fake tree.
Nothing here fails on a machine that lacks a fact: a file that is missing or does not
parse leaves that fact at its "unknown" value (0 counts, -1 speeds and NUMA nodes),
because a virtual machine that hides its NIC speed is normal, not an error.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from .model import Nic, NodeFacts, RankFacts
from . import gpus as gpu_facts

SYSFS = Path("/sys")


def node_name(configured: str) -> str:
    """The node's name: ``configured`` (FMCOMM_NODE_ID) if set, else the hostname."""
    return configured or socket.gethostname()


def parse_cpu_list(text: str) -> list[int]:
    """``0-3,8,10-11`` -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    out: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path, unknown: int) -> int:
    text = _read(path)
    try:
        return int(text) if text is not None else unknown
    except ValueError:
        return unknown


def online_cpus(sysfs: Path = SYSFS) -> list[int]:
    text = _read(sysfs / "devices/system/cpu/online")
    try:
        return parse_cpu_list(text) if text else []
    except ValueError:
        return []


def sockets(sysfs: Path = SYSFS) -> int:
    ids = {_read_int(sysfs / f"devices/system/cpu/cpu{c}/topology/physical_package_id", -1)
           for c in online_cpus(sysfs)}
    ids.discard(-1)
    return len(ids)


def numa_cpus(sysfs: Path = SYSFS) -> dict[int, list[int]]:
    """NUMA node -> its CPUs, for the online NUMA nodes."""
    text = _read(sysfs / "devices/system/node/online")
    out: dict[int, list[int]] = {}
    try:
        nodes = parse_cpu_list(text) if text else []
    except ValueError:
        return out
    for n in nodes:
        cpus = _read(sysfs / f"devices/system/node/node{n}/cpulist")
        try:
            out[n] = parse_cpu_list(cpus) if cpus else []
        except ValueError:
            out[n] = []
    return out


def rank_facts(sysfs: Path = SYSFS, allowed: set[int] | None = None) -> RankFacts:
    """The CPUs this process may use and the NUMA node of the first of them."""
    if allowed is None:
        try:
            allowed = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            allowed = set(online_cpus(sysfs))
    numa = -1
    if allowed:
        first = min(allowed)
        numa = next((n for n, cpus in sorted(numa_cpus(sysfs).items()) if first in cpus), -1)
    return RankFacts(cores=len(allowed), numa_node=numa)


def nics(sysfs: Path = SYSFS) -> tuple[Nic, ...]:
    """Network interfaces that are up, loopback excluded, with their speeds (-1: unknown)."""
    root = sysfs / "class/net"
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return ()
    out = []
    for name in names:
        if name == "lo" or _read(root / name / "operstate") not in ("up", "unknown"):
            continue
        speed = _read_int(root / name / "speed", -1)  # virtio: -1, virtual: EINVAL
        device = root / name / "device"
        pci_path = ""
        if device.exists():
            pci_path = str(Path(os.path.realpath(device)))
        out.append(Nic(name=name, speed_mbps=speed if speed > 0 else -1,
                       numa_node=_read_int(device / "numa_node", -1) if pci_path else -1,
                       pci_path=pci_path))
    return tuple(out)


def node_facts(hostname: str, sysfs: Path = SYSFS) -> NodeFacts:
    cpus = online_cpus(sysfs)
    gpu_list, gpu_paths = gpu_facts.detect(sysfs)
    node_nics = nics(sysfs)
    gpu_nic = tuple(tuple(gpu_facts.pci_class(g.pci_path, n.pci_path, g.numa_node, n.numa_node)
                          for n in node_nics) for g in gpu_list)
    return NodeFacts(hostname=hostname, sockets=sockets(sysfs), numa_nodes=len(numa_cpus(sysfs)),
                     cpus=len(cpus), nics=node_nics, gpus=gpu_list, gpu_paths=gpu_paths,
                     gpu_nic_paths=gpu_nic if node_nics else ())



