"""Algorithm registry: (collective, name) -> schedule function.

A schedule function is ``fn(rank, world, **params) -> RankSchedule`` (params: ``count``,
and ``root``, ``counts`` or ``node_of`` where the collective or algorithm needs them)
and never does I/O.
``native`` (the engine's own collective) is not a schedule and is listed in
:data:`NATIVE`; ``auto`` is resolved by the selector in ``fmcomm.tuning.select``.
"""
from __future__ import annotations

import functools
from typing import Callable

from ..schedule import RankSchedule
from . import (all_gather, all_to_all, barrier, broadcast, halving_doubling, hierarchical, recursive_doubling, reduce,
               reduce_scatter, ring, tree)

ScheduleFn = Callable[..., RankSchedule]

REGISTRY: dict[tuple[str, str], ScheduleFn] = {
    ("all_reduce", "ring"): ring.all_reduce,
    ("all_reduce", "tree"): tree.all_reduce,
    ("all_reduce", "recursive_doubling"): recursive_doubling.all_reduce,
    ("all_reduce", "halving_doubling"): halving_doubling.all_reduce,
    ("all_reduce", "hierarchical"): hierarchical.all_reduce,
    ("reduce_scatter", "ring"): reduce_scatter.ring,
    ("reduce_scatter", "halving"): reduce_scatter.halving,
    ("all_gather", "ring"): all_gather.ring,
    ("all_gather", "recursive_doubling"): all_gather.recursive_doubling,
    ("all_gather", "hierarchical"): all_gather.hierarchical,
    ("broadcast", "binomial"): broadcast.binomial,
    ("broadcast", "chain"): broadcast.chain,
    ("reduce", "binomial"): reduce.binomial,
    ("all_to_all", "pairwise"): all_to_all.pairwise,
    ("all_to_all", "scattered"): all_to_all.scattered,
    ("barrier", "dissemination"): barrier.dissemination,
}

NATIVE = "native"
AUTO = "auto"


@functools.lru_cache(maxsize=None)
def names(collective: str) -> tuple[str, ...]:
    """Every algorithm name ``collective`` accepts, ``auto`` and ``native`` included (the
    registry is fixed at import, so this is computed once per collective)."""
    return (AUTO, NATIVE, *sorted(a for (c, a) in REGISTRY if c == collective))
