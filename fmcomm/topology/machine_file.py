"""The machine file: one versioned JSON form of a :class:`Topology`.

``fmcomm topo --dump FILE`` writes it, ``FMCOMM_TOPO_FILE`` reads it in place of
detection, and the presets in the top-level ``topology/`` folder are machine files.
Shape (format version 1)::

    {"format": "fmcomm-machine", "version": 1,
     "name": "dgx-h100", "description": "...",
     "layout": {"nodes": 1, "ranks_per_node": 8}        # or "node_of": [0, 0, 1, 1]
     "node": {"source": "preset", "note": "...", "sockets": 2, ..., "nics": [...], "gpus": [...]},
                                                         # or "nodes": [one per node]
     "levels": {"intra": {"alpha_s": FIGURE, "bandwidth_Bps": FIGURE, "node_bandwidth_Bps": FIGURE},
                "inter": {...}},
     "kernels": {"reduce_Bps": FIGURE, "copy_Bps": FIGURE},
     "codecs": {"fp8": {"encode_Bps": FIGURE, "decode_Bps": FIGURE}, ...}}

and a FIGURE is ``{"value": 1.5e-06, "source": "detected" | "measured" | "preset",
"note": "where it came from", "spread": 0.04}`` (``spread``, measured figures only:
(max - min) / median over the probe's repeats). Node facts carry one ``source`` and
``note`` for the whole node. Every part but ``format``, ``version`` and the layout is
optional. A file of a newer format version, or one that does not parse, is refused
with a :class:`~fmcomm.errors.MachineFileError` that names the file and the problem.
"""
from __future__ import annotations

import json
import os
from typing import Any

from ..errors import MachineFileError
from .model import LEVELS, SOURCES, CodecRates, Figure, Gpu, Kernels, Level, Nic, NodeFacts, RankFacts, Topology

FORMAT = "fmcomm-machine"
FORMAT_VERSION = 1

_LEVEL_FIELDS = (("alpha", "alpha_s"), ("bandwidth", "bandwidth_Bps"), ("node_bandwidth", "node_bandwidth_Bps"))
_KERNEL_FIELDS = (("reduce", "reduce_Bps"), ("copy", "copy_Bps"))


# ------------------------------------------------------------------ writing

def _figure(f: Figure) -> dict[str, Any]:
    out: dict[str, Any] = {"value": f.value, "source": f.source}
    if f.note:
        out["note"] = f.note
    if f.spread is not None:
        out["spread"] = round(f.spread, 4)
    return out


def _node(n: NodeFacts, source: str, note: str) -> dict[str, Any]:
    out: dict[str, Any] = {"source": source}
    if note:
        out["note"] = note
    out.update(hostname=n.hostname, sockets=n.sockets, numa_nodes=n.numa_nodes, cpus=n.cpus,
               nics=[{"name": x.name, "speed_mbps": x.speed_mbps, "numa_node": x.numa_node} for x in n.nics],
               gpus=[{"name": g.name, "memory_mib": g.memory_mib, "numa_node": g.numa_node} for g in n.gpus])
    if n.gpu_paths:
        out["gpu_paths"] = [list(r) for r in n.gpu_paths]
    if n.gpu_nic_paths:
        out["gpu_nic_paths"] = [list(r) for r in n.gpu_nic_paths]
    return out


def to_dict(topo: Topology, node_source: str = "detected", node_note: str = "") -> dict[str, Any]:
    """The machine-file form of ``topo``."""
    out: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "name": topo.name,
                           "description": topo.description, "layout": {"node_of": list(topo.node_of)}}
    if topo.node_facts:
        out["nodes"] = [_node(n, node_source, node_note) for n in topo.node_facts]
    if topo.rank_facts:
        out["ranks"] = [{"cores": r.cores, "numa_node": r.numa_node} for r in topo.rank_facts]
    if topo.levels:
        out["levels"] = {lv.name: {key: _figure(getattr(lv, attr)) for attr, key in _LEVEL_FIELDS}
                         for lv in topo.levels}
    if topo.kernels:
        out["kernels"] = {key: _figure(getattr(topo.kernels, attr)) for attr, key in _KERNEL_FIELDS}
    if topo.codecs:
        out["codecs"] = {c.family: {"encode_Bps": _figure(c.encode), "decode_Bps": _figure(c.decode)}
                         for c in topo.codecs}
    return out


def dump(topo: Topology, path: str, node_source: str = "detected", node_note: str = "") -> None:
    """Write ``topo`` to ``path`` (through a temporary file, so a reader never sees half of it)."""
    text = json.dumps(to_dict(topo, node_source, node_note), indent=1)
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------ reading

class _Reader:
    """Typed access to a parsed file; every failure names the field."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, problem: str) -> MachineFileError:
        return MachineFileError(self.path, f"{where}: {problem}")

    def get(self, obj: Any, key: str, kind, where: str, default: Any = ...) -> Any:
        if not isinstance(obj, dict):
            raise self.fail(where, f"expected an object, got {type(obj).__name__}")
        if key not in obj:
            if default is ...:
                raise self.fail(f"{where}.{key}", "missing")
            return default
        value = obj[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.fail(f"{where}.{key}", f"expected {names}, got {type(value).__name__} {value!r}")
        return value

    def figure(self, obj: Any, where: str, positive: bool) -> Figure:
        value = self.get(obj, "value", (int, float), where)
        source = self.get(obj, "source", str, where)
        if source not in SOURCES:
            raise self.fail(f"{where}.source", f"{source!r} is not one of {', '.join(SOURCES)}")
        if value != value or value < 0 or (positive and value == 0) or value == float("inf"):
            raise self.fail(f"{where}.value", f"{value!r} is not a {'positive' if positive else 'non-negative'} "
                                              f"finite number")
        spread = self.get(obj, "spread", (int, float), where, None)
        return Figure(float(value), source, self.get(obj, "note", str, where, ""),
                      float(spread) if spread is not None else None)

    def node(self, obj: Any, where: str) -> NodeFacts:
        source = self.get(obj, "source", str, where, "detected")
        if source not in SOURCES:
            raise self.fail(f"{where}.source", f"{source!r} is not one of {', '.join(SOURCES)}")
        nics = tuple(Nic(self.get(x, "name", str, f"{where}.nics[{i}]"),
                         self.get(x, "speed_mbps", int, f"{where}.nics[{i}]"),
                         self.get(x, "numa_node", int, f"{where}.nics[{i}]", -1))
                     for i, x in enumerate(self.get(obj, "nics", list, where, [])))
        gpus = tuple(Gpu(i, self.get(x, "name", str, f"{where}.gpus[{i}]"),
                         self.get(x, "memory_mib", int, f"{where}.gpus[{i}]", 0),
                         self.get(x, "numa_node", int, f"{where}.gpus[{i}]", -1))
                     for i, x in enumerate(self.get(obj, "gpus", list, where, [])))
        paths = self.matrix(obj, "gpu_paths", len(gpus), len(gpus), where)
        gpu_nic = self.matrix(obj, "gpu_nic_paths", len(gpus), len(nics), where)
        return NodeFacts(hostname=self.get(obj, "hostname", str, where, ""),
                         sockets=self.get(obj, "sockets", int, where, 0),
                         numa_nodes=self.get(obj, "numa_nodes", int, where, 0),
                         cpus=self.get(obj, "cpus", int, where, 0), nics=nics, gpus=gpus,
                         gpu_paths=paths, gpu_nic_paths=gpu_nic)

    def matrix(self, obj: Any, key: str, rows: int, cols: int, where: str) -> tuple[tuple[str, ...], ...]:
        m = self.get(obj, key, list, where, [])
        if not m:
            return ()
        if len(m) != rows or any(not isinstance(r, list) or len(r) != cols for r in m):
            raise self.fail(f"{where}.{key}", f"expected a {rows} x {cols} matrix")
        if any(not isinstance(x, str) for r in m for x in r):
            raise self.fail(f"{where}.{key}", "entries must be strings such as NV18, PIX, SYS")
        return tuple(tuple(r) for r in m)


def from_dict(data: Any, path: str = "<machine file>") -> Topology:
    rd = _Reader(path)
    fmt = rd.get(data, "format", str, "top level")
    if fmt != FORMAT:
        raise rd.fail("format", f"{fmt!r}, expected {FORMAT!r}")
    version = rd.get(data, "version", int, "top level")
    if version > FORMAT_VERSION:
        raise MachineFileError(path, f"format version {version} is newer than this fmcomm reads "
                                     f"(up to {FORMAT_VERSION}); upgrade fmcomm or dump the file again")
    if version < 1:
        raise rd.fail("version", f"{version} is not a format version")
    layout = rd.get(data, "layout", dict, "top level")
    if "node_of" in layout:
        node_of = rd.get(layout, "node_of", list, "layout")
        if not node_of or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in node_of):
            raise rd.fail("layout.node_of", "expected a non-empty list of node indices >= 0")
    else:
        nodes = rd.get(layout, "nodes", int, "layout")
        per = rd.get(layout, "ranks_per_node", int, "layout")
        if nodes < 1 or per < 1:
            raise rd.fail("layout", f"{nodes} nodes x {per} ranks per node: both must be >= 1")
        node_of = [r // per for r in range(nodes * per)]
    topo = Topology.from_keys(node_of)  # renumbered by first appearance, as detection numbers nodes
    n_nodes = topo.nodes
    facts: tuple[NodeFacts, ...] = ()
    if "node" in data:
        facts = (rd.node(data["node"], "node"),) * n_nodes
    elif "nodes" in data:
        listed = rd.get(data, "nodes", list, "top level")
        if len(listed) != n_nodes:
            raise rd.fail("nodes", f"{len(listed)} entries for {n_nodes} nodes in the layout")
        facts = tuple(rd.node(x, f"nodes[{i}]") for i, x in enumerate(listed))
    ranks: tuple[RankFacts, ...] = ()
    if "ranks" in data:
        listed = rd.get(data, "ranks", list, "top level")
        if len(listed) != topo.world:
            raise rd.fail("ranks", f"{len(listed)} entries for {topo.world} ranks in the layout")
        ranks = tuple(RankFacts(rd.get(x, "cores", int, f"ranks[{i}]", 0), rd.get(x, "numa_node", int, f"ranks[{i}]", -1))
                      for i, x in enumerate(listed))
    levels = []
    for name, obj in rd.get(data, "levels", dict, "top level", {}).items():
        if name not in LEVELS:
            raise rd.fail(f"levels.{name}", f"unknown level; levels are {', '.join(LEVELS)}")
        figs = {attr: rd.figure(rd.get(obj, key, dict, f"levels.{name}"), f"levels.{name}.{key}",
                                positive=attr != "alpha") for attr, key in _LEVEL_FIELDS}
        levels.append(Level(name, **figs))
    kernels = None
    if "kernels" in data:
        obj = rd.get(data, "kernels", dict, "top level")
        kernels = Kernels(**{attr: rd.figure(rd.get(obj, key, dict, "kernels"), f"kernels.{key}", positive=True)
                             for attr, key in _KERNEL_FIELDS})
    codecs = tuple(CodecRates(family, *(rd.figure(rd.get(obj, key, dict, f"codecs.{family}"), f"codecs.{family}.{key}",
                                                  positive=True) for key in ("encode_Bps", "decode_Bps")))
                   for family, obj in rd.get(data, "codecs", dict, "top level", {}).items())
    return Topology(topo.node_of, node_facts=facts, rank_facts=ranks,
                    levels=tuple(sorted(levels, key=lambda lv: LEVELS.index(lv.name))), kernels=kernels, codecs=codecs,
                    name=rd.get(data, "name", str, "top level", ""),
                    description=rd.get(data, "description", str, "top level", ""))


def load(path: str) -> Topology:
    """Read a machine file; MachineFileError names the file and what is wrong with it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise MachineFileError(path, f"cannot read it: {e.strerror or e}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise MachineFileError(path, f"not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise MachineFileError(path, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return from_dict(data, path)
