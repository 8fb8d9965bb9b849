"""The Communicator: one group of ranks, its transport, its configuration.

It turns a user call into a plan (algorithm + schedule, cached per shape), checks the
arguments locally before any byte moves, and runs the plan through the executor,
inline or, for ``async_op=True``, on the communicator's one worker thread. Calls run
in the order they were made on every rank, sync or async, which is what keeps their
sequence numbers (and so their messages) matched across ranks.
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
from typing import Any

import numpy as np
import torch

from . import algorithms, schedule
from .config import Config
from .dtypes import DType, dtype_of, redop_code
from .errors import CollectiveError, CommTimeoutError, FmcommError, InvalidArgument
from .executor import Call, Executor, compile_rounds
from .kernels import Reducer, resolve_native
from .select import select
from .transport.base import Transport

log = logging.getLogger("fmcomm")


class Work:
    """Handle of an ``async_op=True`` call, as torch.distributed's ``Work``."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the collective finished; raise its error if it failed."""
        try:
            self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise CommTimeoutError(f"work not finished within {timeout} s (the collective itself "
                                   f"is still running and may complete later)") from None
        return True

    def is_completed(self) -> bool:
        return self._future.done()

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None


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


class Communicator:
    def __init__(self, transport: Transport, config: Config | None = None):
        self.transport = transport
        self.config = config or Config.from_env()
        self.rank, self.world = transport.rank, transport.world
        self.use_native = resolve_native(self.config.native)
        self.executor = Executor(transport, self.config.timeout, self.config.check)
        self._seq = 0
        self._lock = threading.Lock()
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: list[concurrent.futures.Future] = []
        self._failed: BaseException | None = None

    # ---------------------------------------------------------------- plans
    @functools.lru_cache(maxsize=256)
    def _plan(self, collective: str, algo: str, count: int, itemsize: int):
        fn = algorithms.REGISTRY[(collective, algo)]
        full = schedule.build(collective, algo, fn, self.world, count, count, count=count)
        schedule.validate(full)
        return compile_rounds(full.ranks[self.rank], itemsize, self.config.segment_bytes)

    # ------------------------------------------------------------ execution
    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def _submit(self, fn, async_op: bool):
        if self._failed is not None:
            raise FmcommError(f"rank {self.rank}: communicator is unusable after an earlier failure: {self._failed}")
        if not async_op:
            self._drain()
            self._guarded(fn)
            return None
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fmcomm")
        fut = self._worker.submit(self._guarded, fn)
        self._pending.append(fut)
        return Work(fut)

    def _guarded(self, fn) -> None:
        try:
            fn()
        except CollectiveError as e:
            # Messages of the failed call may still be in flight; later calls could
            # match them, so this communicator refuses further work.
            self._failed = e
            raise

    def _drain(self) -> None:
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    # ----------------------------------------------------------- collectives
    def all_reduce(self, tensor, op: str = "sum", algo: str | None = None, async_op: bool = False,
                   output=None):
        """Reduce ``tensor`` over all ranks; every rank gets the result in place.

        ``output``, if given, receives the result instead and ``tensor`` is left as it
        was (MPI's out-of-place form). Returns a :class:`Work` if ``async_op``.
        """
        inp, dtype = as_flat_tensor(tensor, "all_reduce tensor")
        op = op.lower() if isinstance(op, str) else op
        redop_code(op)
        out = inp
        if output is not None:
            out, odtype = as_flat_tensor(output, "all_reduce output")
            if odtype != dtype or out.numel() != inp.numel() or out.device != inp.device:
                raise InvalidArgument(f"all_reduce output must match the input: {inp.numel()} {dtype.name} "
                                      f"on {inp.device}, got {out.numel()} {odtype.name} on {out.device}")
        device = inp.device.type
        name = select("all_reduce", inp.numel() * dtype.itemsize, dtype, op, device, self.transport,
                      self.config, algo)
        seq = self._next_seq()
        call = Call("all_reduce", name, inp.numel(), dtype, op, seq)
        if name == algorithms.NATIVE:
            run = functools.partial(self.executor.run_native, call, inp, out)
        else:
            plan = self._plan("all_reduce", name, inp.numel(), dtype.itemsize)
            reducer = Reducer(dtype, op, self.use_native)
            run = functools.partial(self.executor.run_schedule, call, plan, inp, out, reducer)
        log.debug("rank %d seq %d all_reduce %s %d x %s op %s", self.rank, seq, name, inp.numel(), dtype.name, op)
        return self._submit(run, async_op)

    def close(self) -> None:
        try:
            self._drain()
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True)
                self._worker = None
            self.transport.close()
