"""A topology as text for people (``fmcomm topo``)."""
from __future__ import annotations

from typing import Any, Optional

from .model import Figure, Topology


def rate(bps: float) -> str:
    """Bytes per second in the unit that reads best."""
    for unit, scale in (("TB/s", 1e12), ("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.3g} B/s"


def seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _fig(f: Figure, text: str) -> str:
    spread = f", spread {f.spread:.0%}" if f.spread is not None else ""
    return f"{text} ({f.source}{spread})"


def describe(topo: Topology, build: Optional[dict[str, Any]] = None, notes: bool = False) -> str:
    """Levels, ranks per node, α/β per level, NICs, GPUs and (``build``) the native paths built."""
    lines = []
    title = topo.name or "detected topology"
    lines.append(f"{title}: {topo.world} ranks on {topo.nodes} node{'s' if topo.nodes != 1 else ''}"
                 + (f" - {topo.description}" if topo.description else ""))
    sizes = sorted({len(g) for g in topo.groups()})
    lines.append(f"  ranks per node: {', '.join(map(str, sizes))}")
    levels = ["intra"] + (["inter"] if topo.nodes > 1 else [])
    lines.append(f"  levels: {' -> '.join(levels)}")
    if topo.levels:
        for lv in topo.levels:
            lines.append(f"  {lv.name:5}  alpha {_fig(lv.alpha, seconds(lv.alpha.value))}  "
                         f"bandwidth {_fig(lv.bandwidth, rate(lv.bandwidth.value))}  "
                         f"node {_fig(lv.node_bandwidth, rate(lv.node_bandwidth.value))}")
            if notes:
                for what, f in (("alpha", lv.alpha), ("bandwidth", lv.bandwidth), ("node", lv.node_bandwidth)):
                    if f.note:
                        lines.append(f"         {what}: {f.note}")
    else:
        lines.append("  alpha/beta: not measured (fmcomm topo --probe, or FMCOMM_TOPO_FILE)")
    if topo.kernels:
        k = topo.kernels
        lines.append(f"  kernels: reduce {_fig(k.reduce, rate(k.reduce.value))}, copy {_fig(k.copy, rate(k.copy.value))}")
    if topo.codecs:
        lines.append("  codecs: " + "; ".join(f"{c.family} encode {_fig(c.encode, rate(c.encode.value))}, "
                                              f"decode {_fig(c.decode, rate(c.decode.value))}" for c in topo.codecs))
    for i, node in enumerate(topo.node_facts):
        if i and node == topo.node_facts[i - 1]:
            continue  # nodes alike: printed once
        ranks = topo.ranks_on(i)
        head = f"  node {i}" + (f" ({node.hostname})" if node.hostname else "") + f": ranks {_span(ranks)}"
        cpu = [f"{node.sockets} socket{'s' if node.sockets != 1 else ''}" if node.sockets else "",
               f"{node.numa_nodes} NUMA" if node.numa_nodes else "", f"{node.cpus} CPUs" if node.cpus else ""]
        lines.append(head + (": " + ", ".join(c for c in cpu if c) if any(cpu) else ""))
        if topo.rank_facts:
            cores = sorted({topo.rank_facts[r].cores for r in ranks})
            lines.append(f"    cores per rank: {', '.join(map(str, cores))}")
        for n in node.nics:
            speed = f"{n.speed_mbps / 1000:g} Gb/s" if n.speed_mbps > 0 else "speed unknown"
            lines.append(f"    nic {n.name}: {speed}" + (f", NUMA {n.numa_node}" if n.numa_node >= 0 else ""))
        if node.gpus:
            names = sorted({g.name for g in node.gpus})
            lines.append(f"    gpus: {len(node.gpus)} x {', '.join(names)}")
            for row_i, row in enumerate(node.gpu_paths):
                lines.append(f"      gpu{row_i}: " + " ".join(f"{p:>5}" for p in row))
        else:
            lines.append("    gpus: none")
    if build is not None:
        lines.append("  native paths: " + ", ".join(f"{k}={v}" for k, v in build.items()))
    return "\n".join(lines)


def _span(ranks: tuple[int, ...]) -> str:
    if ranks and list(ranks) == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))
