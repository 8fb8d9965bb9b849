"""Machine presets: machine files of real machines, shipped with the package.

They live in the repository's top-level ``topology/`` folder; an installed package
carries them as ``fmcomm/_presets/`` (setup.py maps the folder there). A preset
describes one kind of node and a default node count; :func:`resize` makes a topology
of any number of such nodes for the simulator.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..errors import InvalidArgument, TopologyError
from . import machine_file
from .model import Topology

_HERE = Path(__file__).resolve().parent


def preset_dir() -> Path:
    """Where the presets are: the installed copy, else the source tree's topology/."""
    for candidate in (_HERE.parent / "_presets", _HERE.parent.parent / "topology"):
        if candidate.is_dir() and any(candidate.glob("*.json")):
            return candidate
    raise TopologyError(f"no machine presets found (looked in {_HERE.parent / '_presets'} and "
                        f"{_HERE.parent.parent / 'topology'})")


def names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.json"))


def path_of(name: str) -> Path:
    path = preset_dir() / f"{name}.json"
    if not path.is_file():
        raise TopologyError(f"no preset named {name!r}; presets are {', '.join(names())}")
    return path


def load(name_or_path: str) -> Topology:
    """A preset by name (``dgx-h100``) or any machine file by path."""
    if os.sep in name_or_path or name_or_path.endswith(".json") or os.path.exists(name_or_path):
        return machine_file.load(name_or_path)
    return machine_file.load(str(path_of(name_or_path)))


def resize(topo: Topology, nodes: int, ranks_per_node: int | None = None) -> Topology:
    """``topo``'s kind of node, ``nodes`` times, ranks numbered node by node.

    ``topo`` must have the same number of ranks on every node (as every preset has);
    ``ranks_per_node`` overrides that number.
    """
    sizes = {len(g) for g in topo.groups()}
    if len(sizes) != 1:
        raise InvalidArgument(f"topology {topo.name or '(unnamed)'} has nodes of {sorted(sizes)} ranks; "
                              f"only a topology with equal nodes can be resized")
    per = ranks_per_node or sizes.pop()
    kinds = set(topo.node_facts)
    facts = (next(iter(kinds)),) * nodes if len(kinds) == 1 else ()
    grown = Topology.uniform(nodes, per)
    return dataclasses.replace(topo, node_of=grown.node_of, node_facts=facts, rank_facts=())
