"""The Communicator: the front door of one group of ranks.

It checks a call's arguments locally before any byte moves and turns the call into a
:class:`~fmcomm.tuning.select.Request`; its planner (``fmcomm.runtime.planner``)
chooses what runs and compiles it once per shape; its runner
(``fmcomm.runtime.runner``) runs calls one at a time in program order, inline or, for
``async_op=True``, on the communicator's one worker thread, through the executor.
"""
from __future__ import annotations

import logging
import time
import zlib
from typing import Any

import numpy as np
import torch

from . import algorithms, topology
from . import compressed, compression
from .algorithms import AUTO, compressed_plan
from .compression import ErrorFeedback
from .config import Config
from .dtypes import DType, dtype_of, redop_code
from .errors import CommTimeoutError, FmcommError, InvalidArgument, MismatchError
from .kernels import Reducer, resolve_native
from .runtime.executor import Call, Executor, arguments_agreed
from .runtime.planner import Planner
from .runtime.runner import Runner, Work
from .transport.base import Transport
from .transport.shared_memory import SharedMemoryCache
from .tuning import table as tuning_table
from .tuning.select import Request, configured

log = logging.getLogger("fmcomm")

__all__ = ["Communicator", "Work", "as_flat_tensor"]


def as_flat_tensor(obj: Any, what: str) -> tuple[torch.Tensor, DType]:
    """A 1-D view of a torch tensor or NumPy array, sharing its memory."""
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise InvalidArgument(f"{what}: NumPy array must be C-contiguous (use np.ascontiguousarray)")
        if not obj.flags.writeable:
            raise InvalidArgument(f"{what}: NumPy array is read-only")
        dtype = dtype_of(obj.dtype)
        return torch.from_numpy(obj.reshape(-1)), dtype
    if isinstance(obj, torch.Tensor):
        if not obj.is_contiguous():
            raise InvalidArgument(f"{what}: tensor must be contiguous (call .contiguous())")
        if obj.is_sparse or obj.layout != torch.strided:
            raise InvalidArgument(f"{what}: only dense (strided) tensors are supported")
        return obj.view(-1), dtype_of(obj.dtype)
    raise InvalidArgument(f"{what}: expected a torch.Tensor or numpy.ndarray, got {type(obj).__name__}")


def _redop(op) -> str:
    redop_code(op)  # InvalidArgument naming the op unless it is one fmcomm reduces
    return op.lower()


def _splits(tensor, sizes, world: int, what: str) -> list[int]:
    """Split sizes in elements: ``sizes`` counts rows of dim 0, as torch's all_to_all_single."""
    shape = tuple(tensor.shape)
    rows = shape[0] if shape else 1
    row = (int(np.prod(shape[1:])) if len(shape) > 1 else 1)
    if sizes is None:
        if rows % world:
            raise InvalidArgument(f"all_to_all_single: {what} dim 0 ({rows}) does not divide by world size "
                                  f"{world}; pass {what}_split_sizes")
        return [rows // world * row] * world
    sizes = [int(x) for x in sizes]
    if len(sizes) != world:
        raise InvalidArgument(f"all_to_all_single: {what}_split_sizes has {len(sizes)} entries for {world} ranks")
    if any(x < 0 for x in sizes):
        raise InvalidArgument(f"all_to_all_single: {what}_split_sizes {sizes} has a negative size")
    if sum(sizes) != rows:
        raise InvalidArgument(f"all_to_all_single: {what}_split_sizes {sizes} sum to {sum(sizes)}, "
                              f"but dim 0 is {rows}")
    return [x * row for x in sizes]


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


class Communicator:
    def __init__(self, transport: Transport, config: Config | None = None):
        self.transport = transport
        self.config = config or Config.from_env()
        self.rank, self.world = transport.rank, transport.world
        self.topology = topology.detect(transport, self.config.node_id, self.config.timeout, self.config.topo_file)
        self.use_native = resolve_native(self.config.native)
        self.executor = Executor(transport, self.config.timeout, self.config.check)
        self.planner = Planner(self.rank, self.world, self.topology, self._agreed_table(),
                               self.config.segment_bytes)
        self.runner = Runner(self.rank)
        self.error_feedback = ErrorFeedback()  # default state of compressed all-reduces (see all_reduce)
        self._levels_cache: tuple | None = None
        # Where this is a node group of levels(): its /dev/shm segment, attached on first use.
        self.shared_memory = SharedMemoryCache(self)

    def _agreed_table(self) -> tuning_table.TuningTable:
        """The tuning table every rank follows: each rank finds its own (a file, a cache
        per machine), so they check in one small all-reduce that they found the same;
        where they did not, every rank follows the default table (and says so), since
        ranks choosing differently would disagree on every call."""
        table = tuning_table.active(self.config.tuning_file, self.topology.fingerprint())
        if self.world == 1:
            return table
        mine = tuning_table.digest(table)
        both = torch.tensor([mine, -mine], dtype=torch.int64)
        self._engine_all_reduce(both, "max", "ranks did not compare their tuning tables", "init")
        if int(both[0]) != -int(both[1]):
            if self.rank == 0:
                log.warning("ranks found different tuning tables (this rank: %s); every rank follows the default "
                            "table instead", table.source)
            return tuning_table.default_table()
        return table

    def request(self, collective: str, nbytes: int, dtype: DType, op: str, device: str,
                algo: str | None = None) -> Request:
        """A call as selection sees it: ``algo`` (or FMCOMM_ALGO) forces a choice."""
        forced = algo.lower() if algo else configured(collective, self.config.algo)
        return Request(collective, nbytes, dtype.name, op, device, forced,
                       self.transport.supports_native(collective, dtype, op, device), self.transport.name)

    def _launch(self, collective: str, inp: torch.Tensor, out: torch.Tensor, dtype: DType, op: str,
                algo: str | None, async_op: bool, input_count: int, output_count: int, params: tuple,
                header_count: int, root: int = -1, average: bool = True, native_start=None):
        """Plan and run one collective (the path every public call takes)."""
        request = self.request(collective, max(inp.numel(), out.numel()) * dtype.itemsize, dtype, op,
                               inp.device.type, algo)
        name = self.planner.choose(request).algorithm
        if name == algorithms.NATIVE:
            rounds = reducer = None
        else:
            rounds = self.planner.rounds(collective, name, dtype.itemsize, input_count, output_count, params)
            reducer = Reducer(dtype, op, self.use_native)

        def run() -> None:
            call = Call(collective, name, header_count, dtype, op, self.runner.next_seq(), root)
            log.debug("rank %d seq %d %s %s %d x %s op %s", self.rank, call.seq, collective, name, header_count,
                      dtype.name, op)
            if rounds is None:
                self.executor.run_native(call, inp, out, native_start)
            else:
                self.executor.run_schedule(call, rounds, inp, out, reducer, average)
        return self.runner.submit(run, async_op)

    def _root(self, root: int, what: str) -> int:
        if not isinstance(root, int) or not 0 <= root < self.world:
            raise InvalidArgument(f"{what} {root!r} is outside this group of {self.world} ranks")
        return root

    @staticmethod
    def _same_kind(a: torch.Tensor, b: torch.Tensor, adtype: DType, bdtype: DType, what: str) -> None:
        if adtype != bdtype or a.device != b.device:
            raise InvalidArgument(f"{what}: output and input must share dtype and device "
                                  f"({adtype.name} on {a.device} vs {bdtype.name} on {b.device})")

    def all_reduce(self, tensor, op: str = "sum", algo: str | None = None, async_op: bool = False,
                   output=None, compress=None, state: ErrorFeedback | None = None, key=None,
                   max_error: float | None = None):
        """Reduce ``tensor`` over all ranks; every rank gets the result in place.

        ``output``, if given, receives the result instead and ``tensor`` is left as it
        was (MPI's out-of-place form). Returns a :class:`Work` if ``async_op``.

        ``compress`` (``"fp8"``, ``"onebit@inter"``, ``"topk:0.01"``, ...; see
        :mod:`fmcomm.compression`) sends coded values instead of full precision, for
        float sum/avg; every rank still ends with identical bytes. Families with
        error feedback keep residuals between calls in ``state`` (default: this
        communicator's ``error_feedback``) under ``key`` and the compressor's name:
        give each tensor that is reduced repeatedly (each gradient bucket) its own
        key. Without ``key`` nothing is kept from one call to the next.

        ``compress="auto"`` needs ``max_error``: the compressor (or none) that is
        fastest here among those whose relative error ``||result - sum|| / ||sum||``
        is at most ``max_error`` runs: by the tuning table's measurements (``fmcomm
        tune``), else by the cost model on a machine file's figures, else none.
        """
        inp, dtype = as_flat_tensor(tensor, "all_reduce tensor")
        op = _redop(op)
        out = inp
        if output is not None:
            out, odtype = as_flat_tensor(output, "all_reduce output")
            if odtype != dtype or out.numel() != inp.numel() or out.device != inp.device:
                raise InvalidArgument(f"all_reduce output must match the input: {inp.numel()} {dtype.name} "
                                      f"on {inp.device}, got {out.numel()} {odtype.name} on {out.device}")
        n = inp.numel()
        if isinstance(compress, str) and compress.strip().lower() == AUTO:
            compress = self.compression_for(n * dtype.itemsize, max_error).spec
        elif max_error is not None:
            raise InvalidArgument("max_error applies to compress='auto' only")
        spec = compression.parse(compress)
        if spec.enabled:
            return self._compressed_all_reduce(inp, out, dtype, op, spec, state, key, algo, async_op)
        return self._launch("all_reduce", inp, out, dtype, op, algo, async_op, n, n, (("count", n),), n)

    def compression_for(self, nbytes: int, max_error):
        """What ``compress="auto"`` runs for ``nbytes`` within ``max_error`` (see all_reduce)."""
        if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not max_error > 0:
            raise InvalidArgument(f"compress='auto' needs max_error, a relative error > 0 (such as 0.05), "
                                  f"got {max_error!r}")
        return self.planner.compression(nbytes, float(max_error))

    def _compressed_all_reduce(self, inp, out, dtype: DType, op: str, spec, state, key, algo, async_op):
        if op not in ("sum", "avg"):
            raise InvalidArgument(f"compressed all_reduce reduces with sum or avg, not {op!r}")
        if dtype.name not in ("float32", "float16", "bfloat16"):
            raise InvalidArgument(f"compressed all_reduce needs float32, float16 or bfloat16, not {dtype.name}")
        if algo is not None:
            raise InvalidArgument("compressed all_reduce chooses its own exchange; pass algo= or compress=, "
                                  "not both")
        if state is not None and not isinstance(state, ErrorFeedback):
            raise InvalidArgument(f"state must be an fmcomm.compression.ErrorFeedback, got {type(state).__name__}")
        if key is None:
            # No key, no memory: residuals kept under a guessed key (the element count,
            # once) grew with every new size and mixed tensors of one size. A call
            # without a key codes with error feedback inside the call only.
            state, key = ErrorFeedback(), "call"
        elif state is None:
            state = self.error_feedback
        layout = compressed_plan.plan(self.topology.node_of, spec.level == "inter", inp.numel())
        levels = self.levels() if layout.two_level else None  # a collective: made here, in order

        def run() -> None:
            # One agreement on the whole call (count, dtype, op, spec); its inner calls
            # then follow alike on every rank and skip their own.
            call = Call("all_reduce", f"compressed:{spec.text}", inp.numel(), dtype, op, self.runner.next_seq())
            self.executor.check_native(call)
            with arguments_agreed():
                compressed.all_reduce(self, inp, out, spec, state, key, op, layout, levels)
        return self.runner.submit(run, async_op)

    def run_async(self, fn) -> Work:
        """Run ``fn()`` on this communicator's worker, after every earlier async call.

        For work around collectives that should not hold up the caller (the DDP hook
        reorders a bucket there): collectives ``fn`` calls on this communicator run
        inline, in order. ``fn`` must not create groups (``new_group``, a first
        ``levels()``), which wait for the worker it is running on.
        """
        return self.runner.submit(fn, True)

    def levels(self) -> "tuple[Communicator, Communicator] | None":
        """(this rank's node group, its lane group) for two-level collectives, made once.

        The lane group joins the ranks with this rank's local index on every node.
        None where that split does not exist: one node, or nodes with unequal numbers
        of ranks. Every rank must call this at the same point (it makes groups).
        """
        if self._levels_cache is None:
            nodes = self.topology.groups()
            if len(nodes) < 2 or len({len(n) for n in nodes}) != 1:
                self._levels_cache = (None,)
            else:
                mine = node = lane = None
                for members in nodes:
                    g = self.new_group(members)
                    if g is not None:
                        node, mine = g, members
                for i in range(len(nodes[0])):
                    g = self.new_group([members[i] for members in nodes])
                    if g is not None:
                        lane = g
                # Bytes the groups send count as this communicator's traffic.
                node.executor.stats = lane.executor.stats = self.executor.stats
                self._levels_cache = (node, lane)
        return None if self._levels_cache == (None,) else self._levels_cache

    def reduce_scatter(self, output, input, op: str = "sum", algo: str | None = None, async_op: bool = False):
        """Reduce ``input`` (world blocks of ``output``'s size) over all ranks; rank r gets block r."""
        out, odtype = as_flat_tensor(output, "reduce_scatter output")
        inp, idtype = as_flat_tensor(input, "reduce_scatter input")
        self._same_kind(out, inp, odtype, idtype, "reduce_scatter")
        n = out.numel()
        if inp.numel() != n * self.world:
            raise InvalidArgument(f"reduce_scatter: input has {inp.numel()} elements, expected world size "
                                  f"{self.world} x output's {n}")
        return self._launch("reduce_scatter", inp, out, idtype, _redop(op), algo, async_op, n * self.world, n,
                            (("count", n),), n)

    def all_gather(self, output, input, algo: str | None = None, async_op: bool = False):
        """Every rank's ``input`` concatenated in rank order into every rank's ``output``."""
        out, odtype = as_flat_tensor(output, "all_gather output")
        inp, idtype = as_flat_tensor(input, "all_gather input")
        self._same_kind(out, inp, odtype, idtype, "all_gather")
        n = inp.numel()
        if out.numel() != n * self.world:
            raise InvalidArgument(f"all_gather: output has {out.numel()} elements, expected world size "
                                  f"{self.world} x input's {n}")
        return self._launch("all_gather", inp, out, idtype, "sum", algo, async_op, n, n * self.world,
                            (("count", n),), n)

    def broadcast(self, tensor, src: int, algo: str | None = None, async_op: bool = False):
        """Rank ``src``'s ``tensor`` into every rank's ``tensor``."""
        t, dtype = as_flat_tensor(tensor, "broadcast tensor")
        src = self._root(src, "broadcast src")
        n = t.numel()
        return self._launch("broadcast", t, t, dtype, "sum", algo, async_op, n, n,
                            (("count", n), ("root", src)), n, root=src)

    def reduce(self, tensor, dst: int, op: str = "sum", algo: str | None = None, async_op: bool = False):
        """Reduce ``tensor`` over all ranks into rank ``dst``'s ``tensor``; other ranks' tensors are untouched."""
        t, dtype = as_flat_tensor(tensor, "reduce tensor")
        dst = self._root(dst, "reduce dst")
        n = t.numel()
        return self._launch("reduce", t, t, dtype, _redop(op), algo, async_op, n, n,
                            (("count", n), ("root", dst)), n, root=dst, average=self.rank == dst)

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None,
                          algo: str | None = None, async_op: bool = False):
        """Rank i's block j of ``input`` to rank j's block i of ``output``, as torch's all_to_all_single.

        Split sizes count rows of dim 0 (elements for 1-D tensors); without them dim 0
        is divided evenly. Ranks learn each other's splits in one small all-reduce, so
        splits that do not pair up raise MismatchError instead of hanging.
        """
        out, odtype = as_flat_tensor(output, "all_to_all_single output")
        inp, idtype = as_flat_tensor(input, "all_to_all_single input")
        self._same_kind(out, inp, odtype, idtype, "all_to_all_single")
        if out.numel() and inp.numel() and _overlaps(out, inp):
            raise InvalidArgument("all_to_all_single: output and input must not share memory")
        send = _splits(input, input_split_sizes, self.world, "input")
        recv = _splits(output, output_split_sizes, self.world, "output")
        matrix = self._exchange_splits(send)
        for peer in range(self.world):
            if matrix[peer][self.rank] != recv[peer]:
                raise MismatchError(f"all_to_all_single: rank {peer} sends {matrix[peer][self.rank]} elements "
                                    f"here, but output_split_sizes expects {recv[peer]}",
                                    rank=self.rank, op="all_to_all", peer=peer)
        return self._all_to_all_counts(out, inp, idtype, matrix, algo, async_op)

    def _all_to_all_counts(self, out: torch.Tensor, inp: torch.Tensor, dtype: DType, matrix, algo: str | None,
                           async_op: bool):
        """All-to-all with every rank's send counts known (``matrix[i][j]``: rank i to rank j)."""
        counts = tuple(tuple(int(x) for x in row) for row in matrix)
        key = zlib.crc32(repr(counts).encode())
        # One schedule describes every rank: its buffers are sized for the largest rank.
        biggest_in = max(sum(row) for row in counts)
        biggest_out = max(sum(col) for col in zip(*counts))
        recv_counts = [row[self.rank] for row in counts]
        return self._launch("all_to_all", inp, out, dtype, "sum", algo, async_op, biggest_in, biggest_out,
                            (("counts", counts),), key, native_start=lambda: self.transport.native_all_to_all(
                                inp, out, list(counts[self.rank]), recv_counts))

    def _engine_all_reduce(self, t: torch.Tensor, op: str, what: str, during: str) -> None:
        """``t`` (int64) reduced in place by the engine's own all-reduce, bounded by the timeout
        (for small control exchanges outside the executor's sequence of calls)."""
        req = self.transport.native_all_reduce(t, t, dtype_of("int64"), op)
        if not self.transport.wait([req], time.monotonic() + self.config.timeout):
            raise CommTimeoutError(f"{what} within the timeout", rank=self.rank, op=during)

    def _exchange_splits(self, send: list[int]) -> list[list[int]]:
        """Every rank's send counts (one row each), through the engine's all-reduce."""
        # The exchange is a collective: it must follow earlier async calls. Inside a call
        # already running (run_async on the worker), those have run: waiting would wait on itself.
        if not self.runner.inside_call():
            self.runner.drain()
        m = torch.zeros(self.world * self.world, dtype=torch.int64)
        m[self.rank * self.world:(self.rank + 1) * self.world] = torch.tensor(send, dtype=torch.int64)
        if self.world > 1:
            self._engine_all_reduce(m, "sum", "split sizes were not exchanged", "all_to_all")
        flat = m.tolist()
        return [flat[i * self.world:(i + 1) * self.world] for i in range(self.world)]

    def barrier(self, async_op: bool = False):
        """Return once every rank has entered the barrier."""
        empty = torch.empty(0, dtype=torch.int32)
        return self._launch("barrier", empty, empty, dtype_of("int32"), "sum", None, async_op, 0, 0, (), 0)

    def new_group(self, ranks) -> "Communicator | None":
        """A communicator over ``ranks`` (of this one), made by every rank of this one.

        Returns None on ranks not in ``ranks``, as torch.distributed.new_group gives
        them no usable group.
        """
        ranks = list(ranks)
        if sorted(set(ranks)) != sorted(ranks) or any(not 0 <= r < self.world for r in ranks):
            raise InvalidArgument(f"new_group ranks {ranks} must be distinct ranks of 0..{self.world - 1}")
        self.runner.drain()
        sub = self.transport.subgroup(ranks, self.config.timeout)
        return Communicator(sub, self.config) if sub is not None else None

    def close(self) -> None:
        """Finish pending calls, then release the worker thread, the node and lane groups
        of ``levels()`` (this communicator made them), shared memory and the transport
        (a torch.distributed group stays its owner's)."""
        try:
            self.runner.close()
        finally:
            levels, self._levels_cache = self._levels_cache, None
            for group in levels or ():
                if group is not None:
                    group.close()
            self.shared_memory.close()
            self.transport.close()
