"""Run every rank of a schedule in one process, on NumPy: the correctness reference.

The simulator shares no arithmetic with the executor: it uses NumPy's ufuncs (and,
for bfloat16, which NumPy lacks, float32 arithmetic with an explicit round to nearest
even), so agreement between the two is evidence, not tautology. It follows the round
semantics of ``fmcomm.schedule`` exactly: sends read their ranges at the start of a
round, receives land, then local steps run in order.
"""
from __future__ import annotations

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
