"""Runs one rank's schedule over a transport. It decides nothing.

Per round: post every receive, post every send, then run the local steps in order.
A local step waits only for the receives it reads, so the reduce of a segment runs
while later segments are still arriving. Messages longer than ``segment_bytes`` are
cut into segments; both ends cut by the same rule, so messages match in posting order.

Before any data moves, the ranks agree on the call (operation, sequence number,
count, dtype, reduction, algorithm, root) in one small all-reduce of the engine's
own: the MAX of the call's fields and of their negations, so every rank sees
whether any field differs anywhere. A rank that disagrees on anything, including
which algorithm or whether to compress (which decide who talks to whom, so peers
could not have told), gets ``MismatchError`` on every rank before any buffer is
touched; a rank that never arrives gives ``CommTimeoutError`` on the others.

Inside a composite call (a compressed all-reduce) the ranks agree on the composite's
arguments once, up front; its inner calls follow from those arguments alike on every
rank, so they skip their own agreement (``arguments_agreed``): each is a round trip,
and on a loaded machine every round trip costs a scheduling delay.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
import zlib
import numpy as np
import torch

from ..dtypes import BY_CODE, DTYPES, REDOPS, DType
from ..errors import CollectiveError, CommTimeoutError, MismatchError, TransportError
from ..kernels import Reducer, finish_avg
from ..schedule import Copy, Range, RankSchedule, Recv, Reduce, Send
from ..transport.base import Transport

COLLECTIVE_CODES = {"all_reduce": 1, "reduce_scatter": 2, "all_gather": 3, "broadcast": 4,
                    "reduce": 5, "all_to_all": 6, "barrier": 7}
_HEADER_MAGIC = 0x666D636F6D6D  # "fmcomm"
_HEADER_FIELDS = ("magic", "seq", "collective", "algo", "count", "dtype", "op", "root")
# MPI guarantees tags up to 32767; each operation gets one, cycling.
_TAG_CYCLE = 16384


def data_tag(seq: int) -> int:
    return seq % _TAG_CYCLE + 1


_agreed = threading.local()  # .active while a composite call whose arguments every rank agreed on runs here


@contextlib.contextmanager
def arguments_agreed():
    """Calls made on this thread inside the block skip their argument headers."""
    outer = getattr(_agreed, "active", False)
    _agreed.active = True
    try:
        yield
    finally:
        _agreed.active = outer


def _checking(check: bool) -> bool:
    return check and not getattr(_agreed, "active", False)


def algo_code(name: str) -> int:
    code = zlib.crc32(name.encode())
    _ALGO_NAMES.setdefault(code, name)
    return code


# Algorithm names by header code, so a mismatch names the other rank's choice: the
# registry's schedules, the engine's own, every compressor at its default settings
# (compressed calls are named "compressed:<spec>"), and every name this process used.
_ALGO_NAMES: dict[int, str] = {}


@functools.lru_cache(maxsize=1)
def _known_algorithms() -> None:
    """Fill _ALGO_NAMES with every name a rank may use by default (once per process)."""
    from .. import algorithms, compression
    for _, name in algorithms.REGISTRY:
        algo_code(name)
    algo_code(algorithms.NATIVE)
    for family in ("fp16", "bf16", "fp8", "fp8:e5m2", "onebit", "topk:0.01"):
        for level in ("", "@inter"):
            algo_code("compressed:" + compression.parse(family + level).text)


@dataclasses.dataclass(frozen=True)
class Call:
    """What one rank was asked to do: compared across ranks by the header."""
    collective: str
    algo: str
    count: int
    dtype: DType
    op: str
    seq: int
    root: int = -1

    def header(self) -> np.ndarray:
        return np.array([_HEADER_MAGIC, self.seq, COLLECTIVE_CODES[self.collective], algo_code(self.algo),
                         self.count, self.dtype.code, REDOPS[self.op], self.root], dtype=np.int64)


_CODE_NAMES = {
    "dtype": {d.code: d.name for d in BY_CODE.values()},
    "op": {v: k for k, v in REDOPS.items()},
    "collective": {v: k for k, v in COLLECTIVE_CODES.items()},
}


def _field_text(field: str, value: int, algo_name: str | None) -> str:
    """A header field as a person reads it (dtype and op names instead of codes)."""
    if field == "algo":
        _known_algorithms()
        return algo_name or _ALGO_NAMES.get(value, f"an algorithm this rank does not know (code {value})")
    return str(_CODE_NAMES.get(field, {}).get(value, value))


# ------------------------------------------------------------- compiled rounds

@dataclasses.dataclass(frozen=True)
class _Msg:
    peer: int
    buf: str
    start: int  # bytes
    end: int


@dataclasses.dataclass(frozen=True)
class _Local:
    kind: str  # "reduce" or "copy"
    dst: Range
    a: Range
    b: Range | None
    deps: tuple[int, ...]  # indices of receive messages that must have landed


@dataclasses.dataclass(frozen=True)
class _Round:
    recvs: tuple[_Msg, ...]
    sends: tuple[_Msg, ...]
    locals: tuple[_Local, ...]


@dataclasses.dataclass(frozen=True)
class CompiledSchedule:
    """One rank's schedule cut into segments and resolved to byte ranges, once per plan."""
    rounds: tuple[_Round, ...]
    send_to: frozenset[int]
    recv_from: frozenset[int]
    scratch_count: int
    wire_bytes: int  # data bytes this rank sends per run (headers not counted)
    inter_node_bytes: int  # of which to ranks on other nodes


@dataclasses.dataclass
class TrafficStats:
    """Data bytes this rank sent, counted by the executor from the plans it ran."""
    wire_bytes: int = 0
    inter_node_bytes: int = 0
    calls: int = 0

    def count(self, wire_bytes: int, inter_node_bytes: int) -> None:
        # A node and a lane group share one TrafficStats and may run at once (the
        # pipelined @inter all-reduce), so the sums are taken under a lock.
        with _STATS_LOCK:
            self.wire_bytes += wire_bytes
            self.inter_node_bytes += inter_node_bytes
            self.calls += 1


_STATS_LOCK = threading.Lock()


def _segments(peer: int, r: Range, seg: int, isz: int) -> list[_Msg]:
    return [_Msg(peer, r.buf, (r.offset + o) * isz, (r.offset + o + min(seg, r.count - o)) * isz)
            for o in range(0, r.count, seg)]


def _same_memory(a: str, b: str) -> bool:
    return a == b or {a, b} == {"input", "output"}


def _deps(rng: Range, recvs: list[_Msg], isz: int) -> tuple[int, ...]:
    lo, hi = rng.offset * isz, rng.end * isz
    return tuple(i for i, m in enumerate(recvs) if _same_memory(m.buf, rng.buf) and m.start < hi and lo < m.end)


def compile_rounds(rs: RankSchedule, itemsize: int, segment_bytes: int,
                   node_of: tuple[int, ...] | None = None) -> CompiledSchedule:
    seg = max(1, segment_bytes // itemsize)
    out = []
    for rnd in rs.rounds:
        recvs = [m for s in rnd if isinstance(s, Recv) for m in _segments(s.peer, s.dst, seg, itemsize)]
        sends = [m for s in rnd if isinstance(s, Send) for m in _segments(s.peer, s.src, seg, itemsize)]
        locals_: list[_Local] = []
        for s in rnd:
            if isinstance(s, Reduce):
                # A reduce reading one received message exactly runs segment by segment.
                fed = next((r for r in (s.a, s.b) if any(
                    isinstance(x, Recv) and x.dst == r for x in rnd)), None)
                if fed is not None:
                    for o in range(0, s.dst.count, seg):
                        n = min(seg, s.dst.count - o)
                        part = lambda r: Range(r.buf, r.offset + o, n)  # noqa: E731
                        a, b = part(s.a), part(s.b)
                        locals_.append(_Local("reduce", part(s.dst), a, b,
                                              _deps(a, recvs, itemsize) + _deps(b, recvs, itemsize)))
                else:
                    locals_.append(_Local("reduce", s.dst, s.a, s.b,
                                          _deps(s.a, recvs, itemsize) + _deps(s.b, recvs, itemsize)))
            elif isinstance(s, Copy):
                locals_.append(_Local("copy", s.dst, s.src, None, _deps(s.src, recvs, itemsize)))
        out.append(_Round(tuple(recvs), tuple(sends), tuple(locals_)))
    send_to, recv_from = rs.peers()
    sent = [(m.peer, m.end - m.start) for r in out for m in r.sends]
    wire = sum(n for _, n in sent)
    inter = sum(n for p, n in sent if node_of is not None and node_of[p] != node_of[rs.rank])
    return CompiledSchedule(tuple(out), frozenset(send_to), frozenset(recv_from), rs.scratch_count, wire, inter)


# ------------------------------------------------------------------ execution

class Executor:
    def __init__(self, transport: Transport, timeout: float, check: bool):
        self.transport, self.timeout, self.check = transport, timeout, check
        self._scratch: torch.Tensor | None = None
        self.stats = TrafficStats()

    # --- helpers that turn transport failures into errors that say where
    def _wait(self, reqs: list, call: Call, peer: int | None, what: str) -> None:
        try:
            ok = self.transport.wait(reqs, time.monotonic() + self.timeout)
        except CollectiveError:
            raise
        except Exception as e:  # noqa: BLE001 - the engine's own exception types vary
            raise TransportError(f"{self.transport.name}: {what} failed: {e}", rank=self.transport.rank,
                                 op=call.collective, seq=call.seq, peer=peer) from e
        if not ok:
            raise CommTimeoutError(f"{what} did not complete within {self.timeout:g} s "
                                   f"(FMCOMM_TIMEOUT); the peer may have died or skipped this call",
                                   rank=self.transport.rank, op=call.collective, seq=call.seq, peer=peer)

    def scratch(self, count: int, like: torch.Tensor) -> torch.Tensor:
        nbytes = count * like.element_size()
        s = self._scratch
        if s is None or s.numel() < nbytes or s.device != like.device:
            s = self._scratch = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=like.device)
        return s[:nbytes].view(like.dtype)

    # --- argument agreement
    def check_native(self, call: Call) -> None:
        """Agreement check for native collectives: one small all-reduce of (h, -h) with MAX."""
        if not _checking(self.check) or self.transport.world == 1:
            return
        h = call.header()
        both = torch.from_numpy(np.concatenate([h, -h]))
        req = self.transport.native_all_reduce(both, both, DTYPES["int64"], "max")
        self._wait([req], call, None, "native argument check")
        hi, lo = both[: len(h)].tolist(), [-x for x in both[len(h):].tolist()]
        mine = h.tolist()
        diffs = []
        for name, m, low, high in zip(_HEADER_FIELDS, mine, lo, hi):
            if low == high:
                continue
            other = [v for v in (low, high) if v != m]  # the extremes other ranks hold
            diffs.append(f"{name}: this rank {_field_text(name, m, call.algo)}, another rank "
                         + " / ".join(_field_text(name, v, None) for v in other))
        if diffs:
            raise MismatchError(f"ranks called {call.collective} differently: {', '.join(diffs)}",
                                rank=self.transport.rank, op=call.collective, seq=call.seq)

    # --- the two ways to run a collective
    def run_schedule(self, call: Call, plan: CompiledSchedule, inp: torch.Tensor, out: torch.Tensor,
                     reducer: Reducer, average: bool = True) -> None:
        """Run ``plan``; for op avg, divide ``out`` at the end unless ``average`` is False
        (a reduce's non-root ranks hold no result)."""
        t = self.transport
        self.check_native(call)
        bufs = {"input": inp, "output": out, "scratch": self.scratch(plan.scratch_count, out)}
        # Byte views made once per call; each message is then a cheap slice of one
        # (this loop runs per segment, and per-call Python work is what small
        # messages pay for).
        raw = {k: t.byte_view(v) for k, v in bufs.items()}
        tag = data_tag(call.seq)
        irecv, isend = t.irecv, t.isend

        for rnd in plan.rounds:
            try:
                rreqs = [irecv(m.peer, raw[m.buf][m.start:m.end], tag) for m in rnd.recvs]
                sreqs = [isend(m.peer, raw[m.buf][m.start:m.end], tag) for m in rnd.sends]
            except CollectiveError:
                raise
            except Exception as e:  # noqa: BLE001 - the engine's own exception types vary
                raise TransportError(f"{t.name}: posting a message failed: {e}", rank=t.rank,
                                     op=call.collective, seq=call.seq) from e
            landed = [False] * len(rreqs)
            for loc in rnd.locals:
                for i in loc.deps:
                    if not landed[i]:
                        # The round's sends are finished along with the first receive:
                        # MPI makes progress only inside its calls, so a peer's receive
                        # stalls while this rank computes with its send unfinished.
                        self._wait([rreqs[i], *sreqs], call, rnd.recvs[i].peer, "receive")
                        sreqs = []
                        landed[i] = True
                if loc.kind == "reduce":
                    reducer.ranges(bufs, loc.dst, loc.a, loc.b)
                else:
                    d, src = bufs[loc.dst.buf], bufs[loc.a.buf]
                    if d.data_ptr() != src.data_ptr() or loc.dst.offset != loc.a.offset:
                        d[loc.dst.offset:loc.dst.end].copy_(src[loc.a.offset:loc.a.end])
            pending = [r for r, done in zip(rreqs, landed) if not done] + sreqs
            if pending:
                peers = {m.peer for m in rnd.recvs} | {m.peer for m in rnd.sends}
                self._wait(pending, call, peers.pop() if len(peers) == 1 else None, "round")
        if call.op == "avg" and average:
            finish_avg(out, t.world)
        self.stats.count(plan.wire_bytes, plan.inter_node_bytes)

    def run_native(self, call: Call, inp: torch.Tensor, out: torch.Tensor, start=None) -> None:
        """The engine's own collective: ``start()`` posts it (default: its all-reduce)."""
        self.check_native(call)
        if start is not None:
            try:
                req = start()
            except CollectiveError:
                raise
            except Exception as e:  # noqa: BLE001
                raise TransportError(f"{self.transport.name}: native {call.collective} failed: {e}",
                                     rank=self.transport.rank, op=call.collective, seq=call.seq) from e
            self._wait([req], call, None, f"native {call.collective}")
            return
        if call.count:
            try:
                req = self.transport.native_all_reduce(inp, out, call.dtype, call.op)
            except CollectiveError:
                raise
            except Exception as e:  # noqa: BLE001
                raise TransportError(f"{self.transport.name}: native all-reduce failed: {e}",
                                     rank=self.transport.rank, op=call.collective, seq=call.seq) from e
            self._wait([req], call, None, "native all-reduce")
        elif inp.data_ptr() != out.data_ptr():
            out.copy_(inp)
        if call.op == "avg":
            finish_avg(out, self.transport.world)

