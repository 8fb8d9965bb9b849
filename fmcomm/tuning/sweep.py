"""``fmcomm tune``: measure which algorithm is fastest here, per collective and size,
and write the tuning table that ``auto`` then follows.

Every rank runs this; rank 0 prints and writes. For each collective and message size
the candidates are the engine's own collective (``native``) and every schedule of
that collective. It does not sweep blindly:

1. **The cost model drops what cannot win.** With the topology's measured figures
   (the probes run first where no machine file gives them), each schedule is priced
   at that size; one predicted ``prune`` times slower than the best-priced schedule
   is not measured. ``native`` cannot be priced and is always measured.
2. **Few samples first, more where the choice is close.** Every candidate left is
   timed ``first`` times, interleaved (iteration i runs every candidate once before
   iteration i+1, so a machine that slows down mid-run slows all of them alike), each
   sample the slowest rank's time between barriers. Candidates slower than ``drop``
   times the best median stop there. If the runner-up is still within noise of the
   best (their medians closer than their spreads, or than ``noise`` of the best), the
   close ones get ``more`` samples each and the choice is made on all of them; those
   still within noise are recorded as such.

Adjacent sizes with the same winner merge into one row covering ``[first size, next
winner's size)``; a size whose fastest is within the noise floor (``noise``) of the
choice below it keeps that choice (noise must not cut the table into rows). The smallest row starts at 0 and
the largest is unbounded. Rows are
for this job's world size, node count, ranks per node and dtype: another layout or
dtype falls through to the default table.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import time
from typing import Any, Callable

import torch

from .. import __version__, algorithms, api
from ..bench.report import Progress, line_plot
from ..dtypes import dtype_of
from ..errors import FmcommError, UnsupportedError
from . import cost
from .select import ranks_per_node
from .table import Row, TuningTable, cache_path

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all")


@dataclasses.dataclass
class TuneArgs:
    collectives: tuple[str, ...] = COLLECTIVES
    min_bytes: int = 4
    max_bytes: int = 64 << 20
    factor: int = 4
    dtype: str = "float32"
    transport: str = "mpi"
    out: str | None = None
    plot: str | None = None  # time against size per candidate, the choice marked (PNG; needs matplotlib)
    warmup: int = 2
    first: int = 5        # samples of every candidate left after pruning
    more: int = 10        # further samples of the candidates still within noise of the best
    prune: float = 3.0    # cost model: a schedule predicted this many times the best-priced one is not measured
    drop: float = 1.5     # after the first samples: a candidate this many times the best median stops
    noise: float = 0.03   # medians closer than this fraction of the best are within noise
    probe: bool = True    # measure α/β first where the topology has no figures
    # compress="auto": the compressors measured beside the uncompressed all-reduce (None:
    # every family at its defaults, also @inter across nodes), from this size up.
    compress: tuple[str, ...] | None = None
    compress_from: int = 64 << 10


@dataclasses.dataclass
class Measured:
    algo: str
    samples: list[float] = dataclasses.field(default_factory=list)  # seconds, slowest rank per call

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Half the inter-quartile range over the median: this candidate's noise."""
        if len(self.samples) < 4:
            return (max(self.samples) - min(self.samples)) / 2 / self.median
        q1, _, q3 = statistics.quantiles(self.samples, n=4)
        return (q3 - q1) / 2 / self.median

    def summary(self) -> dict[str, Any]:
        return {"median_us": round(self.median * 1e6, 2), "spread": round(self.spread, 4),
                "samples": len(self.samples)}


def close(a: Measured, b: Measured, noise: float) -> bool:
    """Whether ``b``'s median is within noise of ``a``'s (``a`` the faster)."""
    gap = b.median - a.median
    return gap <= noise * a.median or gap <= (a.spread * a.median + b.spread * b.median)


@dataclasses.dataclass
class SizeResult:
    nbytes: int
    choice: str
    measured: list[Measured]
    pruned: dict[str, float]       # schedule -> predicted seconds, not measured
    within_noise: list[str]        # candidates indistinguishable from the choice
    keeps: list[str] = dataclasses.field(default_factory=list)  # within the noise floor of the choice


    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bytes": self.nbytes, "choice": self.choice,
                               "candidates": {m.algo: m.summary() for m in self.measured}}
        if self.pruned:
            out["pruned_by_cost_model"] = {k: round(v * 1e6, 2) for k, v in self.pruned.items()}
        if self.within_noise:
            out["within_noise"] = self.within_noise
        if self.keeps:
            out["within_noise_floor"] = self.keeps
        return out


def sizes(a: TuneArgs) -> list[int]:
    out, s = [], max(1, a.min_bytes)
    while s <= a.max_bytes:
        out.append(s)
        s *= max(2, a.factor)
    return out


def _time(ctl, runs: list[Callable], bufs: list, warmup: int, iters: int, pristine: torch.Tensor,
          inplace: bool) -> list[list[float]]:
    """``iters`` samples of each run, interleaved and rotated; each the slowest rank's seconds."""
    n = len(runs)
    times: list[list[float]] = [[] for _ in runs]
    for it in range(warmup + iters):
        for k in [(it + j) % n for j in range(n)]:
            inp, out = bufs[k]
            if inplace:
                out.copy_(pristine)
            ctl.barrier()
            t0 = time.perf_counter()
            runs[k](inp, out, inplace)
            if it >= warmup:
                times[k].append(time.perf_counter() - t0)
    return [ctl.slowest(t) for t in times]


def tune_size(ctl, comm, coll, a: TuneArgs, nbytes: int, topo) -> SizeResult | None:
    """Measure the candidates of ``coll`` at ``nbytes``; None where the size holds no element per rank."""
    dtype = dtype_of(a.dtype)
    world = comm.world
    count, _, out_numel, shown = coll.shape(nbytes, dtype.itemsize, world)
    if count == 0:
        return None
    pristine = coll.make_input(ctl.rank, world, count, dtype, "sum")
    inplace = coll.placements[-1]
    schedules = [algo for algo in algorithms.names(coll.name) if algo not in (algorithms.AUTO, algorithms.NATIVE)]
    pruned: dict[str, float] = {}
    if topo.levels and topo.kernels is not None and len(schedules) > 1:
        predicted = {}
        for algo in schedules:
            try:
                predicted[algo] = cost.price(coll.name, algo, topo, shown, dtype.itemsize).seconds
            except (FmcommError, ValueError):
                pass  # not priceable here: measured
        if predicted:
            best = min(predicted.values())
            pruned = {k: v for k, v in predicted.items() if v > a.prune * best}
    candidates = [algorithms.NATIVE] + [s for s in schedules if s not in pruned]
    run_of: dict[str, Callable] = {}
    for algo in candidates:
        run = coll.fmcomm(comm, algo, "sum")
        try:
            scratch = pristine.clone() if inplace else torch.zeros(out_numel, dtype=pristine.dtype)
            run(pristine.clone(), scratch, inplace)  # unsupported here: known before timing, alike on every rank
        except UnsupportedError:
            continue
        run_of[algo] = run

    def measure(group: list[Measured], iters: int, warmup: int) -> None:
        bufs = [(pristine.clone(), pristine.clone() if inplace else torch.zeros(out_numel, dtype=pristine.dtype))
                for _ in group]
        for m, samples in zip(group, _time(ctl, [run_of[m.algo] for m in group], bufs, warmup, iters, pristine,
                                           inplace)):
            m.samples += samples

    live = [Measured(algo) for algo in run_of]
    measure(live, a.first, a.warmup)
    live.sort(key=lambda m: m.median)
    best = live[0]
    near = [m for m in live[1:] if m.median <= a.drop * best.median and close(best, m, a.noise)]
    if near and a.more:
        measure([best] + near, a.more, 1)
        live.sort(key=lambda m: m.median)
        best = live[0]
    within = [m.algo for m in live[1:] if close(best, m, a.noise)]
    # Only a gap under the noise floor lets the size below's choice stand here (rows_of):
    # wide spreads on a loaded machine would otherwise carry one choice across sizes
    # where another measured clearly faster.
    keeps = [m.algo for m in live[1:] if m.median - best.median <= a.noise * best.median]
    return SizeResult(shown, best.algo, live, pruned, within, keeps)


def tune_compression(ctl, comm, a: TuneArgs, nbytes: int, uncompressed: str, specs: list[str]) -> list[dict]:
    """Compressed all-reduces of ``nbytes`` float32 beside the uncompressed one (``algo=uncompressed``),
    interleaved: time, the relative error of one call from empty residuals on Gaussian
    data, and the bytes this rank sent per call."""
    from ..bench.harness import _compressed_run, _gaussian_inputs, _relative_error
    dtype = dtype_of("float32")
    count = nbytes // dtype.itemsize
    pristine, exact = _gaussian_inputs(ctl.rank, comm.world, count, dtype, "sum")
    runs = {"none": (lambda inp, out, inplace: comm.all_reduce(inp, algo=uncompressed, output=out))}
    for spec in specs:
        runs[spec] = _compressed_run(comm, spec, "sum")
    names = list(runs)
    bufs = [(pristine.clone(), torch.zeros(count)) for _ in names]
    stats = comm.executor.stats
    samples = _time(ctl, [runs[k] for k in names], bufs, a.warmup, a.first, pristine, False)
    out = []
    for name, times in zip(names, samples):
        m = Measured(name, times)
        result = torch.zeros(count)
        sent = stats.wire_bytes
        if name == "none":
            comm.all_reduce(pristine.clone(), algo=uncompressed, output=result)
        else:
            runs[name].fresh(pristine.clone(), result)
        wire = stats.wire_bytes - sent
        error = ctl.maximum(_relative_error(exact, result))
        layout = ranks_per_node(comm.topology.node_of)
        out.append({"spec": name if name == "none" else _canonical(name), "bytes": nbytes,
                    "world": comm.world, "nodes": len(layout), "ranks_per_node": max(layout),
                    "median_us": round(m.median * 1e6, 2), "spread": round(m.spread, 4),
                    "samples": len(times), "rel_error": float(f"{error:.3g}"),
                    "wire_bytes": int(ctl.maximum(float(wire))) if wire or name != "none" else None,
                    **({"algorithm": uncompressed} if name == "none" else {})})
    return out


def _canonical(spec: str) -> str:
    from .. import compression
    return compression.parse(spec).text


def rows_of(collective: str, results: list[SizeResult], dtype: str, node_of: tuple[int, ...]) -> list[Row]:
    """One row per run of adjacent sizes with the same winner (see the module docstring)."""
    layout = ranks_per_node(node_of)
    where = dict(dtypes=(dtype,), world=(len(node_of), len(node_of)), nodes=(len(layout), len(layout)),
                 ranks_per_node=(min(layout), max(layout)))
    rows: list[Row] = []
    runs: list[tuple[str, list[SizeResult]]] = []
    for r in results:
        # A size whose fastest is within the noise floor of the choice below it keeps that
        # choice: noise alone must not cut the table into rows (or flip them from one tune
        # to the next).
        if runs and (runs[-1][0] == r.choice or runs[-1][0] in r.keeps):
            runs[-1][1].append(r)
        else:
            runs.append((r.choice, [r]))
    for i, (choice, run) in enumerate(runs):
        lo = 0 if i == 0 else run[0].nbytes
        hi = runs[i + 1][1][0].nbytes if i + 1 < len(runs) else None
        kept = [r.nbytes for r in run if r.choice != choice]
        note = f"fastest measured at {', '.join(str(r.nbytes) for r in run if r.choice == choice)} bytes" + (
            f"; within noise of the fastest at {', '.join(map(str, kept))}" if kept else "")
        rows.append(Row(collective, choice, lo, hi, note=note, measured=[r.to_json() for r in run], **where))
    return rows


def _other_layouts(path: str, fingerprint: str, rows: list[Row], a: TuneArgs, world: int, nodes: int,
                   measured_compression: bool) -> tuple[list[Row], list[dict]]:
    """What a table already at ``path`` for this machine holds for other layouts (world
    size, nodes, ranks per node, dtype) or other collectives: kept, so one table per
    machine serves every job on it. A table of another machine, or one that does not
    load, is replaced."""
    from .table import load
    from ..errors import TuningFileError
    if not os.path.exists(path):
        return [], []
    try:
        old = load(path)
    except TuningFileError:
        return [], []
    if old.fingerprint != fingerprint:
        return [], []
    mine = {(r.collective, r.dtypes, r.world, r.nodes, r.ranks_per_node) for r in rows}
    kept = [r for r in old.rows if (r.collective, r.dtypes, r.world, r.nodes, r.ranks_per_node) not in mine]
    same_layout = lambda m: m.get("world") == world and m.get("nodes") == nodes  # noqa: E731
    compression = [m for m in old.compression if not (measured_compression and same_layout(m))]
    return kept, compression


def engine_version(transport: str) -> str:
    if transport == "mpi":
        from mpi4py import MPI
        return MPI.Get_library_version().strip().splitlines()[0]
    import torch.distributed as dist
    return f"torch {torch.__version__} {dist.get_backend() if dist.is_initialized() else ''}".strip()


def run_tune(a: TuneArgs) -> TuningTable | None:
    """Tune every collective of ``a`` on this job; rank 0 writes and returns the table."""
    from ..bench.collectives import COLLECTIVES as BENCH
    from ..bench.harness import Control
    unknown = [c for c in a.collectives if c not in BENCH]
    if unknown:
        raise FmcommError(f"fmcomm tune: unknown collective(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(COLLECTIVES)}")
    started = time.monotonic()
    ctl = Control()
    comm = api.init(transport=a.transport)
    topo = comm.topology
    if a.probe and not topo.levels and comm.world > 1:
        from ..topology.probe import probe
        topo = probe(comm.transport, topo, repeats=3, timeout=comm.config.timeout)
    steps = [(c, s) for c in a.collectives for s in sizes(a)]
    progress = Progress(len(steps), ctl.rank == 0)
    results: dict[str, list[SizeResult]] = {c: [] for c in a.collectives}
    measured = full = 0
    for collective, nbytes in steps:
        coll = BENCH[collective]
        r = tune_size(ctl, comm, coll, a, nbytes, topo)
        progress.step(f"{collective} {nbytes} B")
        if r is None:
            continue
        results[collective].append(r)
        measured += sum(len(m.samples) for m in r.measured)
        full += (1 + len(algorithms.names(collective)) - 2) * (a.first + a.more)
    progress.close()
    compressed: list[dict] = []
    if "all_reduce" in a.collectives and a.compress != ():
        from .select import candidate_specs
        specs = list(a.compress) if a.compress else candidate_specs(topo.node_of)
        chosen = {r.nbytes: r.choice for r in results["all_reduce"]}
        at = [n for n in sorted(chosen) if n >= a.compress_from]
        progress = Progress(len(at), ctl.rank == 0)
        for nbytes in at:
            compressed += tune_compression(ctl, comm, a, nbytes, chosen[nbytes], specs)
            measured += (1 + len(specs)) * a.first
            full += (1 + len(specs)) * (a.first + a.more)
            progress.step(f"compressed all_reduce {nbytes} B")
        progress.close()
    table = None
    if ctl.rank == 0:
        rows = [row for c in a.collectives for row in rows_of(c, results[c], a.dtype, topo.node_of)]
        fingerprint = comm.topology.fingerprint()
        meta = {"fmcomm": __version__, "engine": a.transport, "engine_version": engine_version(a.transport),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "world": comm.world, "nodes": topo.nodes, "dtype": a.dtype,
                "measurements": measured, "full_sweep_measurements": full,
                "seconds": round(time.monotonic() - started, 1),
                "settings": {k: v for k, v in dataclasses.asdict(a).items() if k not in ("out", "collectives")}}
        path = a.out or str(cache_path(fingerprint))
        kept_rows, kept_compression = _other_layouts(path, fingerprint, rows, a, comm.world, topo.nodes,
                                                     bool(compressed))
        table = TuningTable(tuple(kept_rows + rows), f"fmcomm tune on this machine ({fingerprint})", fingerprint,
                            meta, tuple(kept_compression + compressed))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        table.dump(path)
        print(describe(table))
        if a.plot:
            plot(table, a.plot)
        print(f"{measured} timed calls against {full} for a full sweep of every candidate "
              f"({measured / max(full, 1):.0%}), {meta['seconds']} s; written: {path}")
    api.finalize()
    import torch.distributed as dist
    if dist.is_initialized() and a.transport == "torch":
        dist.destroy_process_group()  # gloo aborts at exit if its group is still up
    return table


def describe(table: TuningTable) -> str:
    """A tuning table as text (``fmcomm tune --show``): one line per row with what was measured."""
    head = [f"tuning table: {table.source or '-'}  fingerprint {table.fingerprint or '(any)'}"]
    meta = table.meta or {}
    if meta:
        head.append("  " + ", ".join(f"{k} {meta[k]}" for k in ("engine_version", "date", "world", "nodes", "dtype",
                                                                "measurements") if k in meta))
    lines = [f"{'collective':<15}{'bytes from':>12}{'to':>12}  {'choice':<20}{'runner-up (x slower)':<30}"
             f"{'within noise':<20}"]
    for row in table.rows:
        hi = "inf" if row.max_bytes is None else str(row.max_bytes)
        second, noise = "", ""
        for m in row.measured or []:
            cands = sorted(m["candidates"].items(), key=lambda kv: kv[1]["median_us"])
            if len(cands) > 1 and not second:
                second = f"{cands[1][0]} ({cands[1][1]['median_us'] / max(cands[0][1]['median_us'], 1e-9):.2f})"
            noise = noise or ",".join(m.get("within_noise", []))
        lines.append(f"{row.collective:<15}{row.min_bytes:>12}{hi:>12}  {row.algorithm:<20}{second:<30}{noise:<20}")
    if table.compression:
        lines.append(f"compressed all_reduce (compress='auto'): {'bytes':>10}  {'spec':<18}{'time (us)':>12}"
                     f"{'rel error':>11}{'bytes sent':>12}")
        for m in table.compression:
            sent = "-" if m.get("wire_bytes") is None else str(m["wire_bytes"])
            lines.append(f"{'':<41}{m['bytes']:>10}  {m['spec']:<18}{m['median_us']:>12.1f}{m['rel_error']:>11.2g}"
                         f"{sent:>12}")
    return "\n".join(head + lines)


def plot(table: TuningTable, path: str) -> bool:
    """Time against size, one line per ``collective/algorithm`` measured, the chosen
    candidate of each size ringed, to a PNG."""
    series: dict[str, list[tuple[float, float]]] = {}
    chosen = []
    for row in table.rows:
        for m in row.measured or []:
            for algo, c in m["candidates"].items():
                series.setdefault(f"{row.collective}/{algo}", []).append((m["bytes"], c["median_us"]))
            chosen.append((m["bytes"], m["candidates"][m["choice"]]["median_us"]))
    return line_plot(series, path, f"fmcomm tune: {table.source}", "time (us), slowest rank's median", chosen,
                     "chosen", log_y=True)
