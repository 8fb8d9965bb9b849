"""Choosing the algorithm a call runs: ``select(request, topology, table) -> Plan``.

A pure function of its arguments: the same request on the same topology with the same
table gives the same plan on every rank and in every process, which is what lets each
rank choose alone. The order:

1. a forced algorithm (``algo=`` or ``FMCOMM_ALGO``) runs as asked, or is an error
   when it cannot run here: it is never replaced silently;
2. otherwise ``auto`` takes the first row of ``table`` that matches the call (its
   collective, size, dtype, and the world, node count and ranks per node of
   ``topology``) and whose algorithm can run: ``native`` where the engine has the
   collective for the dtype and reduction. A measured table (``fmcomm tune``) is
   consulted before the default table shipped with fmcomm (``default_table.json``);
3. where no measured row covers the call, the default table's row names a schedule
   and the topology has figures (a machine file: latency and bandwidth per level,
   kernel rates), the cost model prices every schedule of the collective on it and
   the cheapest runs. The engine's own collective is not a schedule and cannot be
   priced, so a default row that names it stands. Pricing never depends on a clock
   (no time budget), so every rank prices alike.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from ..algorithms import AUTO, NATIVE, names
from ..dtypes import DTYPES
from ..errors import FmcommError, InvalidArgument, UnsupportedError
from .table import DEFAULT_ORIGIN, Row, TuningTable


@dataclasses.dataclass(frozen=True)
class Request:
    """One call, as selection sees it."""
    collective: str
    nbytes: int                 # the call's largest buffer on this rank
    dtype: str                  # dtype name
    op: str = "sum"
    device: str = "cpu"
    algo: str = AUTO            # a forced algorithm's name, or auto
    native: bool = False        # whether the engine has this collective for dtype, op and device
    engine: str = ""            # the transport's name, for messages


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a call runs, and why (``fmcomm topo --explain`` prints ``reason``)."""
    collective: str
    algorithm: str
    reason: str
    row: Optional[Row] = None   # the table row that chose it, if one did


def configured(collective: str, setting: str) -> str:
    """The algorithm FMCOMM_ALGO asks for ``collective`` (``auto`` where it names none for it)."""
    if ":" not in setting:
        return setting if setting in names(collective) else AUTO
    for part in filter(None, setting.split(";")):
        coll, name = part.split(":")
        if coll == collective:
            return name
    return AUTO


def ranks_per_node(node_of: tuple[int, ...]) -> tuple[int, ...]:
    """How many ranks each node holds, nodes in order of their index."""
    counts: dict[int, int] = {}
    for n in node_of:
        counts[n] = counts.get(n, 0) + 1
    return tuple(counts[k] for k in sorted(counts))


def select(request: Request, topology, table: TuningTable) -> Plan:
    """The plan for ``request`` on ``topology`` (anything with ``node_of``), by ``table``."""
    coll, algo = request.collective, request.algo.lower()
    if algo not in names(coll):
        raise InvalidArgument(f"unknown algorithm {algo!r} for {coll}; choose from {', '.join(names(coll))}")
    if algo == NATIVE and not request.native:
        raise UnsupportedError(f"the {request.engine or 'engine'} transport has no native {coll} for "
                               f"{request.dtype} {request.op} on {request.device}; use algo='ring' or 'auto'")
    if algo != AUTO:
        return Plan(coll, algo, "forced (algo= or FMCOMM_ALGO)")
    layout = ranks_per_node(tuple(topology.node_of))
    for row in table.rows:
        if row.algorithm == NATIVE and not request.native:
            continue
        if row.matches(coll, request.nbytes, request.dtype, layout):
            plan = Plan(coll, row.algorithm, f"{row.origin or table.source} row {row.index}: {row.describe()}", row)
            if row.origin == DEFAULT_ORIGIN and row.algorithm != NATIVE:
                return by_cost(request, topology, plan) or plan
            return plan
    if request.native:
        return Plan(coll, NATIVE, f"no row of {table.source} covers it; the engine's own")
    raise UnsupportedError(f"no algorithm can run {coll} of {request.dtype} {request.op} on {request.engine}: "
                           f"no row of {table.source} covers it and the engine has no native {coll}")


def schedule_prices(request: Request, topology) -> dict[str, float]:
    """Seconds the cost model predicts for each schedule of ``request``'s collective on
    ``topology``; empty where the topology has no figures. All-to-all is left out: one
    request does not say how uneven its splits are."""
    if not getattr(topology, "levels", None) or topology.kernels is None or request.collective == "all_to_all":
        return {}
    from . import cost
    itemsize = DTYPES[request.dtype].itemsize
    prices = {}
    for algo in names(request.collective):
        if algo in (AUTO, NATIVE):
            continue
        try:
            prices[algo] = cost.price(request.collective, algo, topology, request.nbytes, itemsize,
                                      full_budget_s=0.0).seconds
        except (FmcommError, ValueError):
            continue  # a level without figures, or a schedule that does not apply here
    return prices


def by_cost(request: Request, topology, fallback: Plan) -> Plan | None:
    """The schedule the cost model prices cheapest for ``request`` on ``topology``; None
    where nothing could be priced (see :func:`schedule_prices`)."""
    prices = schedule_prices(request, topology)
    if not prices:
        return None
    best = min(prices, key=lambda a: (prices[a], a))
    table_choice = prices.get(fallback.algorithm)
    versus = (f", {fallback.algorithm} (the default table's) {table_choice * 1e6:.1f} us"
              if table_choice is not None and best != fallback.algorithm else "")
    return Plan(request.collective, best, f"cost model on {topology.name or 'this topology'}: {best} "
                f"{prices[best] * 1e6:.1f} us predicted{versus}", fallback.row)


@dataclasses.dataclass(frozen=True)
class CompressionChoice:
    spec: str          # a compression spec, "none" for uncompressed
    reason: str
    min_bytes: int = 0  # the smallest measured size from which ``spec`` was the choice (0: not measured)


CANDIDATE_SPECS = ("fp16", "bf16", "fp8", "onebit", "topk:0.01")


def candidate_specs(node_of: tuple[int, ...]) -> list[str]:
    """The compressors ``auto`` weighs: each family at its default settings, also ``@inter``
    where the ranks span several nodes of equal size (two or more ranks each)."""
    layout = ranks_per_node(tuple(node_of))
    inter = len(layout) >= 2 and len(set(layout)) == 1 and layout[0] >= 2
    from .. import compression
    return [compression.parse(s).text for spec in CANDIDATE_SPECS
            for s in ((spec, spec + "@inter") if inter else (spec,))]


def choose_compression(nbytes: int, max_error: float, topology, table: TuningTable) -> CompressionChoice:
    """The compressor (or none) that is fastest for an all-reduce of ``nbytes`` float32
    among those whose relative error is at most ``max_error``.

    By measurement where ``table`` has compressed all-reduces (``fmcomm tune``): the
    measured size nearest ``nbytes`` (by ratio) decides. Otherwise by cost where the
    topology has figures and kernel rates: each candidate priced by the plan of phases
    (``fmcomm.tuning.plans``), its error the table's typical error for its family.
    Otherwise uncompressed: nothing says compression would pay.
    """
    world, nodes = len(topology.node_of), len(ranks_per_node(tuple(topology.node_of)))
    # Measured on this layout (entries that name none hold for any).
    here = [m for m in table.compression if m.get("world", world) == world and m.get("nodes", nodes) == nodes]
    if here:
        sizes = sorted({m["bytes"] for m in here})
        near = min(sizes, key=lambda s: (abs(_log_ratio(s, nbytes)), s))
        best = _fastest_within(here, near, max_error)
        if best is not None:
            none = next((m for m in here if m["bytes"] == near and m["spec"] == "none"), None)
            versus = (f" against none {none['median_us']:.1f} us" if none is not None and best is not none else "")
            first = next(s for s in sizes if _fastest_within(here, s, max_error)["spec"] == best["spec"])
            return CompressionChoice(best["spec"], f"measured at {near} bytes: {best['spec']} {best['median_us']:.1f} us"
                                     f" (error {best['rel_error']:.2g}){versus}",
                                     first if best["spec"] != "none" else 0)
    errors = table.compression_error or {}
    if getattr(topology, "levels", None) and topology.kernels is not None and topology.codecs:
        from . import plans
        from .. import compression
        schedules = schedule_prices(Request("all_reduce", nbytes, "float32"), topology)
        prices = {}
        for spec in candidate_specs(topology.node_of):
            family = compression.parse(spec).family
            if errors.get(family, float("inf")) > max_error:
                continue
            try:
                prices[spec] = plans.price_compressed_all_reduce(topology, nbytes, spec).seconds
            except FmcommError:
                continue
        where = f"cost model on {topology.name or 'this topology'}"
        if not schedules or not prices:
            return CompressionChoice("none", f"{where}: no compressor within error {max_error:g} could be priced "
                                     f"(kernel rates for: {', '.join(c.family for c in topology.codecs)})")
        none_s = min(schedules.values())  # uncompressed: the cheapest schedule
        best = min(prices, key=lambda k: (prices[k], k))
        if prices[best] < none_s:
            return CompressionChoice(best, f"{where}: {best} {prices[best] * 1e6:.1f} us predicted against none "
                                     f"{none_s * 1e6:.1f} us (typical error {errors[compression.parse(best).family]:.2g})")
        return CompressionChoice("none", f"{where}: no compressor within error {max_error:g} is predicted faster "
                                 f"than none ({none_s * 1e6:.1f} us)")
    return CompressionChoice("none", "no measurement (fmcomm tune) and no machine figures: uncompressed")


def _log_ratio(a: int, b: int) -> float:
    return math.log(max(a, 1) / max(b, 1))


def _fastest_within(measured: list[dict], size: int, max_error: float) -> dict | None:
    """The fastest measurement at ``size`` whose error fits (none always fits); None if none was measured there."""
    at = [m for m in measured if m["bytes"] == size and (m["spec"] == "none" or m["rel_error"] <= max_error)]
    return min(at, key=lambda m: (m["median_us"], m["spec"])) if at else None
