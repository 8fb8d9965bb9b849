"""The planner: what each call of a communicator runs, decided once per shape.

It owns the communicator's topology and tuning table, chooses the algorithm with
:func:`fmcomm.tuning.select.select` (a pure function of the request, the topology and
the table), and turns a chosen schedule into this rank's compiled rounds: every
rank's schedule is built and validated once, then this rank's part compiled. Both are
cached per communicator (a DDP run meets the same few bucket shapes every step).
"""
from __future__ import annotations

import collections
import inspect
from typing import Any, Hashable

from .. import algorithms, schedule
from ..tuning.select import CompressionChoice, Plan, Request, choose_compression, select
from ..tuning.table import TuningTable
from .executor import compile_rounds

CACHE_ENTRIES = 256  # shapes kept per communicator; the oldest is dropped beyond it


class _Cache:
    """A bounded mapping that forgets its least recently used entry."""

    def __init__(self, size: int):
        self.size, self._entries = size, collections.OrderedDict()

    def get(self, key: Hashable, make) -> Any:
        try:
            self._entries.move_to_end(key)
            return self._entries[key]
        except KeyError:
            value = self._entries[key] = make()
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
            return value


class Planner:
    def __init__(self, rank: int, world: int, topology, table: TuningTable, segment_bytes: int):
        self.rank, self.world = rank, world
        self.topology, self.table = topology, table
        self.segment_bytes = segment_bytes
        self._plans = _Cache(CACHE_ENTRIES)
        self._rounds = _Cache(CACHE_ENTRIES)

    def choose(self, request: Request) -> Plan:
        return self._plans.get(request, lambda: select(request, self.topology, self.table))

    def compression(self, nbytes: int, max_error: float) -> CompressionChoice:
        """What ``compress="auto"`` runs for ``nbytes`` within ``max_error`` (cached)."""
        return self._plans.get(("compression", nbytes, max_error),
                               lambda: choose_compression(nbytes, max_error, self.topology, self.table))

    def rounds(self, collective: str, algo: str, itemsize: int, input_count: int, output_count: int,
               params: tuple):
        """This rank's compiled rounds of ``algo`` for one shape (built and validated once)."""
        key = (collective, algo, itemsize, input_count, output_count, params)
        return self._rounds.get(key, lambda: self._compile(*key))

    def _compile(self, collective: str, algo: str, itemsize: int, input_count: int, output_count: int,
                 params: tuple):
        fn = algorithms.REGISTRY[(collective, algo)]
        kw = dict(params)
        if "node_of" in inspect.signature(fn).parameters:
            kw["node_of"] = self.topology.node_of  # topology-aware schedules (hierarchical)
        full = schedule.build(collective, algo, fn, self.world, input_count, output_count, **kw)
        # A reduce leaves its non-root outputs alone; an all-to-all's outputs differ in
        # size per rank, so the one output_count is the largest and the rest of it is
        # not written. Every other collective writes all of its output. All-to-all is
        # out of place only (all_to_all_single refuses overlapping buffers), so its
        # schedules are validated with input and output apart.
        schedule.validate(full, output_written=collective not in ("reduce", "all_to_all"),
                          in_place=collective != "all_to_all")
        return compile_rounds(full.ranks[self.rank], itemsize, self.segment_bytes, self.topology.node_of)
