"""Run every rank of a schedule in one process, on NumPy: the correctness reference.

The simulator shares no arithmetic with the executor: it uses NumPy's ufuncs (and,
for bfloat16, which NumPy lacks, float32 arithmetic with an explicit round to nearest
even), so agreement between the two is evidence, not tautology. It follows the round
semantics of ``fmcomm.schedule`` exactly: sends read their ranges at the start of a
round, receives land, then local steps run in order.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .dtypes import DType
from .schedule import Copy, Range, Recv, Reduce, Schedule, Send


def _bf16_widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _bf16_narrow(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    quiet = ((bits >> 16) | 0x0040).astype(np.uint16)
    return np.where(nan, quiet, rounded)


def combine(a: np.ndarray, b: np.ndarray, dtype: DType, op: str) -> np.ndarray:
    """a op b element-wise in ``dtype`` (bfloat16 arrays hold raw uint16 bits)."""
    with np.errstate(all="ignore"):  # integer wrap-around and float overflow are expected results
        if dtype.name == "bfloat16":
            x, y = _bf16_widen(a), _bf16_widen(b)
            if op in ("min", "max"):
                pick_a = (x < y) if op == "min" else (x > y)
                return np.where(pick_a | np.isnan(x), a, b)
            return _bf16_narrow(x + y if op in ("sum", "avg") else x * y)
        if op in ("min", "max"):
            # The executor's rule (a if a < b or a is NaN, else b), which also settles
            # which zero a +0/-0 tie returns.
            pick_a = (a < b) if op == "min" else (a > b)
            if dtype.is_float:
                pick_a |= np.isnan(a)
            return np.where(pick_a, a, b)
        if op in ("sum", "avg"):
            return np.add(a, b)
        return np.multiply(a, b)


def finish_avg(x: np.ndarray, dtype: DType, world: int) -> np.ndarray:
    if world == 1:
        return x
    if dtype.name == "bfloat16":
        return _bf16_narrow(_bf16_widen(x) / np.float32(world))
    if dtype.is_float:
        return (x / x.dtype.type(world)).astype(x.dtype)
    q = x // world  # floor; make it truncation toward zero
    q[(x % world != 0) & (x < 0)] += 1
    return q


def storage(dtype: DType) -> np.dtype:
    return np.dtype(np.uint16) if dtype.name == "bfloat16" else dtype.numpy


def simulate(sched: Schedule, inputs: list[np.ndarray], dtype: DType, op: str,
             in_place: bool = True) -> list[np.ndarray]:
    """Outputs of every rank after running ``sched`` on ``inputs`` (one array per rank)."""
    world = sched.world
    if len(inputs) != world:
        raise ValueError(f"need {world} inputs, got {len(inputs)}")
    bufs = []
    for rs, x in zip(sched.ranks, inputs):
        x = np.array(x, dtype=storage(dtype), copy=True)
        out = x if in_place else np.zeros(sched.output_count, dtype=x.dtype)
        bufs.append({"input": x, "output": out,
                     "scratch": np.zeros(rs.scratch_count, dtype=x.dtype)})

    def view(r: int, rng: Range) -> np.ndarray:
        return bufs[r][rng.buf][rng.offset:rng.end]

    n_rounds = max((len(rs.rounds) for rs in sched.ranks), default=0)
    for ri in range(n_rounds):
        # Messages in flight: (src, dst) -> payloads in posting order.
        wire: dict[tuple[int, int], list[np.ndarray]] = {}
        for rs in sched.ranks:
            for s in rs.rounds[ri] if ri < len(rs.rounds) else ():
                if isinstance(s, Send):
                    wire.setdefault((rs.rank, s.peer), []).append(view(rs.rank, s.src).copy())
        for rs in sched.ranks:
            for s in rs.rounds[ri] if ri < len(rs.rounds) else ():
                if isinstance(s, Recv):
                    view(rs.rank, s.dst)[:] = wire[(s.peer, rs.rank)].pop(0)
        for rs in sched.ranks:
            for s in rs.rounds[ri] if ri < len(rs.rounds) else ():
                if isinstance(s, Reduce):
                    view(rs.rank, s.dst)[:] = combine(view(rs.rank, s.a), view(rs.rank, s.b), dtype, op)
                elif isinstance(s, Copy):
                    view(rs.rank, s.dst)[:] = view(rs.rank, s.src).copy()
    outs = [b["output"] for b in bufs]
    if op == "avg":
        outs = [finish_avg(o, dtype, world) for o in outs]
    return outs


# ---------------------------------------------------------------- pricing at scale
#
# The other half of the simulator: what a collective would take on a machine fmcomm
# will never run on here (a preset of topology/, or a dumped machine file), from the
# cost model pricing the real schedules (fmcomm.tuning.cost). Thousands of ranks
# are priced without building every rank's steps: see that module's docstring.


@dataclasses.dataclass(frozen=True)
class SimRow:
    """One predicted case: an algorithm at a size."""
    collective: str
    algo: str
    nbytes: int
    count: int
    dtype: str
    seconds: float
    algbw: float    # bytes/s
    busbw: float    # bytes/s (nccl-tests' factor)
    picked: bool    # the cost model's choice at this size
    method: str     # how the schedule was priced
    exact: bool


def sizes(min_bytes: int, max_bytes: int, factor: int = 2) -> list[int]:
    """min_bytes, min_bytes * factor, ... up to max_bytes (nccl-tests' -b/-e/-f)."""
    if min_bytes <= 0 or factor < 2 or min_bytes > max_bytes:
        from .errors import InvalidArgument
        raise InvalidArgument(f"sizes from {min_bytes} to {max_bytes} by x{factor}: need 0 < -b <= -e and -f >= 2")
    out, s = [], min_bytes
    while s <= max_bytes:
        out.append(s)
        s *= factor
    return out


def predict(topo, collective: str, byte_sizes: list[int], dtype: DType, algos: list[str] | None = None,
            root: int = 0, compress: list[str] | None = None) -> list[SimRow]:
    """Every candidate schedule of ``collective`` priced on ``topo`` at each size, the
    fastest marked as picked (ties go to the first name in order). ``compress``: also
    the compressed all-reduce with each of these specs (float32 only), priced from its
    plan of phases (``fmcomm.tuning.plans``)."""
    from .errors import InvalidArgument
    from .tuning.cost import BUSBW_FACTOR, Pricer, algorithms
    from .tuning.plans import price_compressed_all_reduce
    if compress and (collective != "all_reduce" or dtype.name != "float32"):
        raise InvalidArgument("compression is priced for float32 all_reduce only")
    names = list(algos) if algos is not None else algorithms(collective)
    ordered = sorted(set(byte_sizes))
    priced = {a: Pricer(collective, a, topo, dtype.itemsize, root).price_all(ordered) for a in names}
    for spec in compress or ():
        priced[spec] = [price_compressed_all_reduce(topo, nbytes, spec) for nbytes in ordered]
    names += list(compress or ())
    rows: list[SimRow] = []
    for k, nbytes in enumerate(ordered):
        found = [priced[a][k] for a in names]
        best = min(range(len(found)), key=lambda i: found[i].seconds)
        for i, e in enumerate(found):
            algbw = nbytes / e.seconds if e.seconds > 0 else 0.0
            rows.append(SimRow(collective, e.algo, nbytes, nbytes // dtype.itemsize, dtype.name, e.seconds, algbw,
                               algbw * BUSBW_FACTOR[collective](topo.world), i == best, e.method, e.exact))
    return rows


def table(rows: list[SimRow], topo, title: str = "") -> str:
    """nccl-tests-like columns: size, count, type, algorithm, predicted time, algbw, busbw, pick."""
    lines = []
    if title:
        lines.append(f"# {title}")
    lines.append(f"# {topo.name or 'topology'}: {topo.world} ranks on {topo.nodes} nodes; predicted by the cost model "
                 f"(fmcomm.tuning.cost) from the schedules the executor runs")
    lines.append(f"#{'size':>12} {'count':>12} {'type':>8} {'algo':>20} {'time':>12} {'algbw':>9} {'busbw':>9}  pick")
    lines.append(f"#{'(B)':>12} {'(elements)':>12} {'':>8} {'':>20} {'(us)':>12} {'(GB/s)':>9} {'(GB/s)':>9}")
    for r in rows:
        lines.append(f" {r.nbytes:>12} {r.count:>12} {r.dtype:>8} {r.algo:>20} {r.seconds * 1e6:>12.1f} "
                     f"{r.algbw / 1e9:>9.3f} {r.busbw / 1e9:>9.3f}  {'*' if r.picked else ''}"
                     + ("" if r.exact else "  (estimate)"))
    methods = sorted({(r.algo, r.method.split(";")[0]) for r in rows})
    lines.append("# how each schedule was priced:")
    lines += [f"#   {a}: {m}" for a, m in methods]
    return "\n".join(lines)


def plot(rows: list[SimRow], topo, path: str) -> bool:
    """busbw against size, one line per algorithm, to a PNG; False (with a message) without matplotlib."""
    from .bench.report import line_plot
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        series.setdefault(r.algo, []).append((r.nbytes, r.busbw / 1e9))
    return line_plot(series, path, f"{rows[0].collective} on {topo.name or 'topology'}: {topo.world} ranks, "
                                   f"{topo.nodes} nodes", "predicted busbw (GB/s)")
