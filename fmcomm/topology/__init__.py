"""Topology: where ranks are, what the machine has, and how fast its links are.

- ``model``: the types (:class:`Topology`, :class:`Level`, :class:`Figure`, node facts).
- ``local``, ``gpus``: what one node can read about itself (sysfs, NVML).
- ``records``, ``detect``: every rank's facts exchanged as fixed-size records.
- ``machine_file``: the versioned JSON form (``fmcomm topo --dump``, ``FMCOMM_TOPO_FILE``).
- ``presets``: machine files of real machines, from the top-level ``topology/`` folder.
- ``probe``: short measurements of α and β per level.
"""
from __future__ import annotations

from .detect import detect
from .local import node_name
from .machine_file import dump, load
from .model import Figure, Gpu, Kernels, Level, Nic, NodeFacts, RankFacts, Topology, group_by_node

__all__ = ["Topology", "Level", "Figure", "Kernels", "Nic", "Gpu", "NodeFacts", "RankFacts", "detect", "node_name",
           "dump", "load", "group_by_node"]
