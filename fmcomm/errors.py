"""The one exception tree of fmcomm.

Every error fmcomm raises derives from :class:`FmcommError`. Errors raised while a
collective runs carry the rank, the operation, its sequence number and (where one is
involved) the peer, so a log line alone says which rank stopped where.
"""
from __future__ import annotations


class FmcommError(RuntimeError):
    """Base class of every error fmcomm raises."""


class ConfigError(FmcommError, ValueError):
    """An unknown option name or a value that does not parse (including FMCOMM_* variables)."""


class InitError(FmcommError):
    """fmcomm could not find its rank/world or start its transport."""


class InvalidArgument(FmcommError, ValueError):
    """A call's own arguments are wrong (dtype, layout, op, algorithm, sizes); raised before any byte moves."""


class UnsupportedError(FmcommError):
    """The combination asked for exists but this transport or build cannot run it."""


class ScheduleError(FmcommError):
    """A schedule failed validation: unmatched send/recv, a range out of bounds, an output left unwritten."""


class CollectiveError(FmcommError):
    """A collective failed while running; names where it stood."""

    def __init__(self, message: str, *, rank: int | None = None, op: str | None = None,
                 seq: int | None = None, peer: int | None = None):
        where = []
        if rank is not None:
            where.append(f"rank {rank}")
        if op is not None:
            where.append(f"op {op}")
        if seq is not None:
            where.append(f"seq {seq}")
        if peer is not None:
            where.append(f"peer {peer}")
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(prefix + message)
        self.rank, self.op, self.seq, self.peer = rank, op, seq, peer


class CommTimeoutError(CollectiveError, TimeoutError):
    """A send or receive did not complete within the configured timeout."""


class MismatchError(CollectiveError):
    """Ranks called the same collective with different arguments (size, dtype, op, algorithm, root)."""


class TransportError(CollectiveError):
    """The engine underneath (MPI, torch.distributed) reported an error."""


class NonFiniteError(CollectiveError, FloatingPointError):
    """A compressed all-reduce met NaN or infinity in some rank's input and FMCOMM_NAN=raise."""


class TopologyError(FmcommError):
    """The topology lacks what was asked of it (figures for a level, a preset by that name)."""


class MachineFileError(TopologyError, ValueError):
    """A machine file (``fmcomm topo --dump``, ``FMCOMM_TOPO_FILE``, a preset) cannot be used; names the file and why."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"machine file {path}: {problem}")
        self.path, self.problem = path, problem


class TuningFileError(FmcommError, ValueError):
    """A tuning table (``fmcomm tune``, ``FMCOMM_TUNING_FILE``) cannot be used; names the file and why."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"tuning table {path}: {problem}")
        self.path, self.problem = path, problem
