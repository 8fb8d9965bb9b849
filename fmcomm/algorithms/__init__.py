"""Algorithm registry: (collective, name) -> schedule function.

A schedule function is ``fn(rank, world, count) -> RankSchedule`` and never does I/O.
``native`` (the engine's own collective) is not a schedule and is listed in
:data:`NATIVE`; ``auto`` is resolved by the selector in ``fmcomm.select``.
"""
from __future__ import annotations

from typing import Callable

from ..schedule import RankSchedule
from . import ring

ScheduleFn = Callable[..., RankSchedule]

REGISTRY: dict[tuple[str, str], ScheduleFn] = {
    ("all_reduce", "ring"): ring.all_reduce,
}

NATIVE = "native"
AUTO = "auto"


def names(collective: str) -> list[str]:
    """Every algorithm name ``collective`` accepts, ``auto`` and ``native`` included."""
    return [AUTO, NATIVE] + sorted(a for (c, a) in REGISTRY if c == collective)
