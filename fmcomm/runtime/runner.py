"""The runner: runs a communicator's calls one at a time, in the order they were made.

Sync calls run on the caller's thread once earlier async calls finished; async calls
run on the communicator's one worker thread. Calls therefore run in program order on
every rank, which is what keeps their sequence numbers (and so their messages)
matched across ranks. A call made by a call that is itself running (a compressed
all-reduce's inner collectives, work handed over with ``run_async``) runs inline, in
order. After a collective failed, messages of the failed call may still be in flight
and could match later calls, so the runner refuses further work (the failure latch).
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Callable

from ..errors import CollectiveError, CommTimeoutError, FmcommError, NonFiniteError


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

    def add_done_callback(self, fn) -> None:
        """Call ``fn(future)`` when the collective finished (at once if it has), as concurrent.futures."""
        self._future.add_done_callback(fn)

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None


class Runner:
    def __init__(self, rank: int):
        self.rank = rank
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: list[concurrent.futures.Future] = []
        self.failed: BaseException | None = None
        # The call context: the thread running one of this runner's calls now (None
        # between calls). Only one call runs at a time, so one field says whether a
        # new call is made from inside a running one.
        self._running_on: int | None = None

    def next_seq(self) -> int:
        """The next call's sequence number: taken when a call runs, not when it is made,
        since calls run one at a time in program order on every rank."""
        with self._seq_lock:
            self._seq += 1
            return self._seq

    def submit(self, fn: Callable[[], None], async_op: bool) -> Work | None:
        """Run ``fn`` as this runner's next call: now, or on the worker for ``async_op``."""
        if self.failed is not None:
            raise FmcommError(f"rank {self.rank}: communicator is unusable after an earlier failure: {self.failed}")
        if self.inside_call():
            self._guarded(fn)
            return None
        if not async_op:
            self.drain()
            self._guarded(fn)
            return None
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fmcomm")
        fut = self._worker.submit(self._guarded, fn)
        self._pending.append(fut)
        return Work(fut)

    def inside_call(self) -> bool:
        """Whether this thread is running one of this runner's calls now."""
        return self._running_on == threading.get_ident()

    def _guarded(self, fn: Callable[[], None]) -> None:
        outer, self._running_on = self._running_on, threading.get_ident()
        try:
            fn()
        except CollectiveError as e:
            # A NonFiniteError is raised by every rank at one agreed point, with
            # nothing in flight: the communicator stays usable.
            if not isinstance(e, NonFiniteError):
                self.failed = e
            raise
        finally:
            self._running_on = outer

    def drain(self) -> None:
        """Wait for every async call made so far; raise the first one's error."""
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def close(self) -> None:
        """Finish pending calls, then stop the worker. After a failure the failed call's
        error went to whoever waited for it: close only releases."""
        try:
            self.drain()
        except FmcommError:
            if self.failed is None:
                raise
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True)
                self._worker = None
