"""Choosing an algorithm for ``algo="auto"``.

For now one documented rule (the tuner of a later issue replaces it with measured
tables): use the engine's native all-reduce wherever it supports the dtype and op,
because for small messages its per-message overhead is far below ours; use ``ring`` where the engine cannot (MPI has no
bfloat16 sum, for example), and from ``auto_ring_min_bytes`` up, where ring's
bandwidth-optimal schedule beat the engine's all-reduce in our benchmark. The
threshold lives in the configuration, not here. From the same threshold up, where
the ranks span several nodes of two or more ranks each, ``hierarchical`` instead of
``ring``: only node sums cross between nodes. On the emulated 2 x 2 cluster at
1 Gbit it took 0.73 of ring's time at 16 MiB and 0.74 at 64 MiB
(benchmarks/results/emulated_2x2_1gbit_all_reduce.txt).
"""
from __future__ import annotations

from .algorithms import AUTO, NATIVE, REGISTRY, names
from .algorithms.hierarchical import group_by_node
from .config import Config
from .dtypes import DType
from .errors import InvalidArgument, UnsupportedError
from .transport.base import Transport


# auto for the collectives that have no measured rule yet: the schedule MPI and NCCL
# default to for mid-size messages on few ranks.
DEFAULT_SCHEDULE = {
    "all_reduce": "ring",
    "reduce_scatter": "ring",
    "all_gather": "ring",
    "broadcast": "binomial",
    "reduce": "binomial",
    "all_to_all": "scattered",  # beat pairwise 1.2x on the emulated 2x2 1gbit link (16 MiB)
    "barrier": "dissemination",
}


def configured(collective: str, setting: str) -> str:
    """The algorithm FMCOMM_ALGO asks for ``collective`` (``auto`` where it names none for it)."""
    if ":" not in setting:
        return setting if setting in names(collective) else AUTO
    for part in filter(None, setting.split(";")):
        coll, name = part.split(":")
        if coll == collective:
            return name
    return AUTO


def _several_shared_nodes(node_of) -> bool:
    """Ranks on two or more nodes, each node holding two or more of them."""
    if not node_of:
        return False
    nodes = group_by_node(tuple(node_of))
    return len(nodes) >= 2 and min(len(members) for members in nodes) >= 2


def select(collective: str, nbytes: int, dtype: DType, op: str, device: str,
           transport: Transport, config: Config, algo: str | None = None, node_of=None) -> str:
    """The algorithm to run: ``algo`` if given, else the configured one, resolving ``auto``.

    ``node_of``: each rank's node index (the topology), for the multi-node rule."""
    algo = algo.lower() if algo else configured(collective, config.algo)
    if algo not in names(collective):
        raise InvalidArgument(f"unknown algorithm {algo!r} for {collective}; choose from {', '.join(names(collective))}")
    native_ok = transport.supports_native(collective, dtype, op, device)
    if algo == NATIVE and not native_ok:
        raise UnsupportedError(f"the {transport.name} transport has no native {collective} for "
                               f"{dtype.name} {op} on {device}; use algo='ring' or 'auto'")
    if algo != AUTO:
        return algo
    if collective == "all_reduce":
        large = bool(config.auto_ring_min_bytes) and nbytes >= config.auto_ring_min_bytes
        if native_ok and not large:
            return NATIVE
        if large and _several_shared_nodes(node_of):
            return "hierarchical"
    default = DEFAULT_SCHEDULE.get(collective)
    if (collective, default) in REGISTRY:
        return default
    if native_ok:
        return NATIVE
    raise UnsupportedError(f"no algorithm can run {collective} of {dtype.name} {op} on {transport.name}")
