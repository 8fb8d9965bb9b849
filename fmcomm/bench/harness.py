"""The benchmark harness behind ``fmcomm bench``.

Every rank runs this; rank 0 prints. For each message size and each implementation
(fmcomm with each requested algorithm, and the peers: MPI's own collective through
mpi4py, torch.distributed's over gloo) it times ``iters`` calls after ``warmup``,
out of place and in place. Each call is timed on every rank between barriers; the
reported time is the median over iterations of the slowest rank's time. All
implementations run in the same invocation, so their ratios are fair on a noisy box;
those on one engine are interleaved iteration by iteration (see _measure_all).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import socket
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from .. import api, compression
from ..dtypes import DType, dtype_of
from ..errors import FmcommError, UnsupportedError
from .collectives import COLLECTIVES, Collective
from .report import Progress, line_plot


@dataclasses.dataclass
class BenchArgs:
    collective: str
    min_bytes: int
    max_bytes: int
    factor: int
    dtype: str = "float32"
    op: str = "sum"
    algos: tuple[str, ...] = ("auto",)
    peers: tuple[str, ...] = ()
    transport: str = "mpi"
    check: bool = False
    iters: int = 20
    warmup: int = 5
    json_path: str | None = None
    # Compression specs (all_reduce only); "none" keeps the uncompressed rows of ``algos``.
    compress: tuple[str, ...] = ("none",)
    plot: str | None = None  # busbw against size per implementation, to this PNG (needs matplotlib)


@dataclasses.dataclass
class Row:
    impl: str
    algo: str
    nbytes: int
    count: int
    times_us: dict[bool, float]  # inplace -> median slowest-rank time
    wrong: dict[bool, int | None]
    note: str = ""
    wire_bytes: int | None = None  # per call, this rank (fmcomm schedules only)
    inter_node_bytes: int | None = None
    rel_err: dict[bool, float] = dataclasses.field(default_factory=dict)  # compressed runs: ||out-sum||/||sum||


def sizes(a: BenchArgs) -> list[int]:
    out, s = [], a.min_bytes
    while s <= a.max_bytes:
        out.append(s)
        if a.factor <= 1:
            break
        s *= a.factor
    return out


class Control:
    """Out-of-band synchronisation for timing: barriers and reductions of timings via MPI."""

    def __init__(self):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD.Dup()
        self.rank, self.world = self.comm.Get_rank(), self.comm.Get_size()

    def barrier(self) -> None:
        self.comm.Barrier()

    def slowest(self, times: list[float]) -> list[float]:
        a = np.asarray(times, dtype=np.float64)
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=self.MPI.MAX)
        return out.tolist()

    def total(self, n: int) -> int:
        return self.comm.allreduce(n, op=self.MPI.SUM)

    def maximum(self, x: float) -> float:
        return self.comm.allreduce(x, op=self.MPI.MAX)


def _measure_all(ctl: Control, runs: list[Callable], a: BenchArgs, dtype: DType, pristine: torch.Tensor,
                 out_numel: int, expected: torch.Tensor | None, inplace: bool,
                 stats=None, judge: Callable | None = None) -> list[tuple[float, Any, tuple[int, int] | None]]:
    """(median slowest-rank time in us, #wrong, traffic) of each of ``runs``, interleaved.

    traffic: (wire bytes, inter-node bytes) per call that ``stats`` (the executor's
    counters) saw during that run's calls; None where a run sent nothing through it
    (a peer, or fmcomm's native algorithm).

    Iteration i runs every implementation once before iteration i+1 starts, so a
    machine that speeds up or slows down mid-run (these are shared and noisy) shifts
    every implementation alike instead of whichever happened to run then.
    """
    bufs = [(pristine.clone(), pristine.clone() if inplace else torch.zeros(out_numel, dtype=pristine.dtype))
            for _ in runs]
    times: list[list[float]] = [[] for _ in runs]
    traffic = [[0, 0, 0] for _ in runs]
    n = len(runs)
    for it in range(a.warmup + a.iters):
        # The order rotates too: whatever runs just after another engine's call pays
        # for that engine's leftovers (gloo's threads finishing, caches), so no
        # implementation may always be the one that pays.
        for k in [(it + j) % n for j in range(n)]:
            run = runs[k]
            inp, out = bufs[k]
            if inplace:
                out.copy_(pristine)  # a fresh input each call; outside the timed region
            before = (stats.wire_bytes, stats.inter_node_bytes, stats.calls) if stats else (0, 0, 0)
            ctl.barrier()
            t0 = time.perf_counter()
            run(inp, out, inplace)
            dt = time.perf_counter() - t0
            if it >= a.warmup:
                times[k].append(dt)
            if stats:
                for j, (now, was) in enumerate(zip((stats.wire_bytes, stats.inter_node_bytes, stats.calls), before)):
                    traffic[k][j] += now - was
    results = []
    for k in range(len(runs)):
        slow = ctl.slowest(times[k])
        wrong = None
        if judge is not None:
            wrong = ctl.maximum(judge(bufs[k][1]))
        elif expected is not None:
            inp, out = bufs[k]
            bad = out != expected
            if dtype.is_float:
                bad &= ~(torch.isnan(out) & torch.isnan(expected))
            wrong = ctl.total(int(bad.sum()))
            if not inplace:
                wrong += ctl.total(int((inp != pristine).sum()))  # out of place must not touch the input
        wire, inter, calls = traffic[k]
        # Per call of the implementation (a compressed all-reduce makes several
        # executor calls; all of their bytes are its bytes).
        runs = a.warmup + a.iters
        results.append((statistics.median(slow) * 1e6, wrong, (wire // runs, inter // runs) if calls else None))
    return results


def run_bench(a: BenchArgs, out=sys.stdout) -> list[Row]:
    coll = COLLECTIVES.get(a.collective)
    if coll is None:
        raise FmcommError(f"unknown collective {a.collective!r}; choose from {', '.join(COLLECTIVES)}")
    dtype = dtype_of(a.dtype)
    ctl = Control()
    comm = api.init(transport=a.transport)
    world = comm.world

    created_pg = False
    specs = [compression.parse(c) for c in a.compress]
    compressing = any(sp.enabled for sp in specs)
    if compressing and (coll.name != "all_reduce" or not dtype.is_float or a.op not in ("sum", "avg")):
        raise FmcommError("--compress applies to all_reduce of a float dtype with op sum or avg")
    impls: list[tuple[str, str, Callable | None, str]] = []
    if not compressing or any(not sp.enabled for sp in specs):
        for algo in a.algos:
            impls.append(("fmcomm", algo, coll.fmcomm(comm, algo, a.op), ""))
    for sp in specs:
        if sp.enabled:
            impls.append(("fmcomm", sp.text, _compressed_run(comm, sp, a.op), ""))
    for peer in a.peers:
        try:
            if peer == "mpi":
                impls.append(("mpi", _MPI_NAMES[coll.name], coll.mpi(ctl, dtype, a.op), ""))
            elif peer == "torch":
                import torch.distributed as dist
                if not dist.is_initialized():
                    from ..transport.torch_dist import init_default_group
                    init_default_group(ctl.rank, ctl.world, mpi_comm=ctl.comm)
                    created_pg = True
                impls.append(("torch", f"{dist.get_backend()}.{_TORCH_NAMES[coll.name]}", coll.torch(world, a.op), ""))
            else:
                raise FmcommError(f"unknown peer {peer!r}; peers are mpi, torch")
        except UnsupportedError as e:
            impls.append((peer, "-", None, str(e)))

    rows: list[Row] = []
    if ctl.rank == 0:
        _print_header(a, world, dtype, out)
    # A progress line (stderr) where the sweep is long enough to wait for: many sizes, or large ones.
    progress = Progress(len(sizes(a)), ctl.rank == 0 and (len(sizes(a)) > 8 or a.max_bytes >= 64 << 20))
    for nbytes in sizes(a):
        count, in_numel, out_numel, shown = coll.shape(nbytes, dtype.itemsize, world)
        judge = None
        if compressing:
            # Compressors see gradient-like data (Gaussian), not the small integers
            # that make the other results exact; every row's error is measured
            # against the float64 sum instead.
            pristine, exact = _gaussian_inputs(ctl.rank, world, count, dtype, a.op)
            expected = None
            judge = functools.partial(_relative_error, exact)
        else:
            pristine = coll.make_input(ctl.rank, world, count, dtype, a.op)
            expected = coll.expected(ctl.rank, world, count, dtype, a.op) if a.check else None
        size_rows = [Row(impl, algo, shown, count, {}, {}, note) for impl, algo, _, note in impls]
        live = []
        for row, (_, _, run, _) in zip(size_rows, impls):
            if run is None:
                continue
            try:
                # A probe call: what is unsupported is known before timing starts.
                scratch_out = pristine.clone() if coll.placements == (True,) else torch.zeros(out_numel, dtype=pristine.dtype)
                run(pristine.clone(), scratch_out, coll.placements == (True,))
                live.append((row, run))
            except UnsupportedError as e:  # the same on every rank: nothing was sent
                row.note = str(e)
        # Implementations on one engine are interleaved; engines are measured one after
        # the other, because gloo's threads keep working after its calls return and
        # would slow whatever MPI call follows (measured: MPI_Allreduce of 4 KiB went
        # from 11 to 35 us when interleaved with gloo).
        for engine in sorted({_engine(row, a) for row, _ in live}):
            group = [(row, run) for row, run in live if _engine(row, a) == engine]
            for inplace in coll.placements:
                results = _measure_all(ctl, [run for _, run in group], a, dtype, pristine, out_numel, expected,
                                       inplace, comm.executor.stats, judge)
                for (row, run), (t, w, traffic) in zip(group, results):
                    row.times_us[inplace], row.wrong[inplace] = t, w
                    if traffic is not None:
                        row.wire_bytes, row.inter_node_bytes = traffic
                    if judge is not None and hasattr(run, "fresh"):
                        out_buf = torch.zeros(out_numel, dtype=pristine.dtype)
                        run.fresh(pristine.clone(), out_buf)
                        row.wrong[inplace] = ctl.maximum(judge(out_buf))
        progress.step(f"{nbytes} B")
        for row in size_rows:
            rows.append(row)
            if ctl.rank == 0:
                _print_row(row, coll, dtype, a.op, world, out)
                if a.json_path:
                    _append_json(a, row, coll, dtype, world)
    progress.close()
    if ctl.rank == 0:
        _print_summary(rows, coll, world, out, compressing)
        if a.plot:
            _plot(rows, coll, world, a.plot)
    api.finalize()
    import torch.distributed as dist
    if dist.is_initialized() and (created_pg or a.transport == "torch"):
        dist.destroy_process_group()  # gloo aborts at exit if its group is still up
    return rows


_MPI_NAMES = {"all_reduce": "MPI_Allreduce", "reduce_scatter": "MPI_Reduce_scatter",
              "all_gather": "MPI_Allgather", "broadcast": "MPI_Bcast", "reduce": "MPI_Reduce",
              "all_to_all": "MPI_Alltoallv"}
_TORCH_NAMES = {"all_reduce": "all_reduce", "reduce_scatter": "reduce_scatter_tensor",
                "all_gather": "all_gather_into_tensor", "broadcast": "broadcast", "reduce": "reduce",
                "all_to_all": "all_to_all_single"}


def _plot(rows: list[Row], coll: Collective, world: int, path: str) -> bool:
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if False in row.times_us or True in row.times_us:
            inplace = False if False in row.times_us else True
            series.setdefault(f"{row.impl} {row.algo}", []).append((row.nbytes, _bw(row, inplace, coll, world)[1]))
    return line_plot(series, path, f"fmcomm bench {coll.name}: {world} ranks", "busbw (GB/s)")


def _compressed_run(comm, spec, op: str):
    state = compression.ErrorFeedback()  # one per row: residuals carry over calls, as in training

    def run(inp, out, inplace):
        key = f"bench{out.numel()}"
        if inplace:
            comm.all_reduce(out, op=op, compress=spec, state=state, key=key)
        else:
            comm.all_reduce(inp, op=op, compress=spec, state=state, key=key, output=out)

    def fresh(inp, out):
        # One call from empty residuals: its error is the coding's own. The timed
        # calls carry residuals from the call before (on the same input), so their
        # results are not what one training step would see.
        comm.all_reduce(inp, op=op, compress=spec, state=compression.ErrorFeedback(), output=out)
    run.fresh = fresh
    return run


def _gaussian_inputs(rank: int, world: int, count: int, dtype: DType, op: str):
    """This rank's N(0, 1) input and the float64 result of every rank's, regenerated here."""
    def one(r):
        g = torch.Generator().manual_seed(1000003 * r + count)
        return torch.randn(count, generator=g, dtype=torch.float32)
    total = torch.zeros(count, dtype=torch.float64)
    for r in range(world):
        total += one(r).double()
    if op == "avg":
        total /= world
    return one(rank).to(dtype.torch), total


def _relative_error(exact: torch.Tensor, out: torch.Tensor) -> float:
    norm = float(exact.norm())
    return float((out.double() - exact).norm()) / norm if norm else float((out.double() - exact).norm())


def _engine(row: Row, a: BenchArgs) -> str:
    return a.transport if row.impl == "fmcomm" else row.impl


def _bw(row: Row, inplace: bool, coll: Collective, world: int) -> tuple[float, float]:
    t = row.times_us.get(inplace, float("nan"))
    if not t or t != t:
        return float("nan"), float("nan")
    algbw = row.nbytes / (t * 1e-6) / 1e9
    return algbw, algbw * coll.busbw_factor(world)


def _print_header(a: BenchArgs, world: int, dtype: DType, out) -> None:
    print(f"# fmcomm bench {a.collective}: {world} ranks on {socket.gethostname()}, dtype {dtype.name}, "
          f"op {a.op}, iters {a.iters}, warmup {a.warmup}, fmcomm transport {a.transport}", file=out)
    print(f"# time: median over iterations of the slowest rank; busbw = algbw x {COLLECTIVES[a.collective].busbw_factor(world):.3f}"
          f" ({a.collective}, nccl-tests' factor)", file=out)
    print(f"#{'impl':>7} {'algo':>24} {'size':>12} {'count':>11} {'type':>8} {'redop':>6}"
          f" {'time':>10} {'algbw':>7} {'busbw':>7} {'#wrong':>7}"
          f" {'time':>10} {'algbw':>7} {'busbw':>7} {'#wrong':>7}", file=out)
    print(f"#{'':>7} {'':>24} {'(B)':>12} {'(elements)':>11} {'':>8} {'':>6}"
          f" {'(us)':>10} {'(GB/s)':>7} {'(GB/s)':>7} {'':>7}"
          f" {'(us)':>10} {'(GB/s)':>7} {'(GB/s)':>7} {'':>7}", file=out)
    print(f"#{'':>7} {'':>24} {'':>12} {'':>11} {'':>8} {'':>6} {'out-of-place':>34} {'in-place':>34}", file=out)
    out.flush()


def _print_row(row: Row, coll: Collective, dtype: DType, op: str, world: int, out) -> None:
    line = f" {row.impl:>7} {row.algo:>24} {row.nbytes:>12} {row.count:>11} {dtype.name:>8} {op:>6}"
    if not row.times_us:
        print(line + f"  unavailable: {row.note}", file=out)
        return
    for inplace in (False, True):
        if inplace not in row.times_us:  # a placement this collective does not have
            line += f" {'-':>10} {'-':>7} {'-':>7} {'-':>7}"
            continue
        algbw, busbw = _bw(row, inplace, coll, world)
        w = row.wrong.get(inplace)
        shown = "N/A" if w is None else (f"{w:.1e}" if isinstance(w, float) else w)
        line += f" {row.times_us[inplace]:>10.1f} {algbw:>7.3f} {busbw:>7.3f} {shown:>7}"
    print(line, file=out)
    out.flush()


def _print_summary(rows: list[Row], coll: Collective, world: int, out, compressing: bool = False) -> None:
    by_impl: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.times_us:
            by_impl.setdefault((r.impl, r.algo), []).append(_bw(r, coll.placements[0], coll, world)[1])
    print(f"# Avg bus bandwidth ({'in-place' if coll.placements[0] else 'out-of-place'}, GB/s):", file=out)
    for (impl, algo), bws in by_impl.items():
        bws = [b for b in bws if b == b]
        if bws:
            print(f"#   {impl:>7} {algo:>24}: {sum(bws) / len(bws):.3f}", file=out)
    if compressing:
        print("# #wrong columns hold the relative error ||result - sum||_2 / ||sum||_2 against the float64 sum "
              "of Gaussian inputs (compressed rows: one call from empty error-feedback residuals)", file=out)
        out.flush()
        return
    total_wrong = sum(w for r in rows for w in r.wrong.values() if w)
    print(f"# Out of bounds values : {total_wrong} {'OK' if total_wrong == 0 else 'FAILED'}", file=out)
    out.flush()


def _append_json(a: BenchArgs, row: Row, coll: Collective, dtype: DType, world: int) -> None:
    with open(a.json_path, "a") as f:
        for inplace in (False, True):
            if inplace not in row.times_us:
                continue
            algbw, busbw = _bw(row, inplace, coll, world)
            f.write(json.dumps({
                "collective": coll.name, "impl": row.impl, "algo": row.algo, "bytes": row.nbytes,
                "count": row.count, "dtype": dtype.name, "op": a.op, "world": world, "inplace": inplace,
                "time_us": row.times_us[inplace], "algbw_GBps": algbw, "busbw_GBps": busbw,
                "wrong": row.wrong.get(inplace), "transport": a.transport if row.impl == "fmcomm" else row.impl,
                "wire_bytes": row.wire_bytes, "inter_node_bytes": row.inter_node_bytes,
                **({"relative_error": row.wrong.get(inplace)} if isinstance(row.wrong.get(inplace), float) else {}),
            }) + "\n")
