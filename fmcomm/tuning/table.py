"""The tuning table: which algorithm ``auto`` runs, as data.

A table is a list of rows; the first row that matches a call and whose algorithm can
run there wins (Open MPI's dynamic rules read the same way). A row matches on the
collective, a byte range ``[min_bytes, max_bytes)`` of the call's largest buffer, and
optionally the dtype, the world size, the number of nodes and the ranks on each node.
``fmcomm tune`` writes tables measured on a machine; the package ships one default
table (``default_table.json``) whose every row says where its figure came from.

Shape (format version 1)::

    {"format": "fmcomm-tuning", "version": 1, "source": "...",
     "fingerprint": "...",                 # the topology it was measured on; "" for any
     "rows": [{"collective": "all_reduce", "min_bytes": 0, "max_bytes": 1048576,
               "algorithm": "native",
               "dtypes": ["float32"],       # optional: any dtype
               "world": [2, 8],             # optional [low, high], inclusive; null: unbounded
               "nodes": [2, null],          # optional
               "ranks_per_node": [2, null], # optional: every node holds this many
               "note": "why", "measured": {...}}],  # free-form, kept for readers
     "compression": [{"spec": "fp8:e4m3@inter", "bytes": 16777216, "median_us": 65165.3,
                      "rel_error": 0.039, "wire_bytes": 1234, "note": "..."}],  # "none" too
     "compression_error": {"fp8": 0.035, ...}}   # typical relative error per family

``compression`` holds measured compressed all-reduces (and the uncompressed one,
``"none"``, at the same sizes) for ``compress="auto"``; ``compression_error`` the
typical relative error of each compressor family, which prices compression by cost
where nothing was measured (the default table's, measured here).

A newer format version, JSON that does not parse, or a row that names an unknown
collective or algorithm is refused with :class:`~fmcomm.errors.TuningFileError`
naming the file and the problem.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from ..algorithms import AUTO, names
from ..errors import TuningFileError

FORMAT = "fmcomm-tuning"
FORMAT_VERSION = 1
DEFAULT_TABLE = Path(__file__).with_name("default_table.json")
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all", "barrier")

Bounds = tuple[int, Optional[int]]


@dataclasses.dataclass(frozen=True)
class Row:
    collective: str
    algorithm: str
    min_bytes: int = 0
    max_bytes: Optional[int] = None
    dtypes: tuple[str, ...] = ()
    world: Optional[Bounds] = None
    nodes: Optional[Bounds] = None
    ranks_per_node: Optional[Bounds] = None
    note: str = ""
    measured: Any = None
    # Where the row was read: its table's source and its index there (for messages).
    origin: str = dataclasses.field(default="", compare=False)
    index: int = dataclasses.field(default=0, compare=False)

    def matches(self, collective: str, nbytes: int, dtype: str, ranks_per_node: tuple[int, ...]) -> bool:
        """Whether this row covers a call of ``nbytes`` bytes of ``dtype`` over nodes of ``ranks_per_node``."""
        if collective != self.collective or nbytes < self.min_bytes:
            return False
        if self.max_bytes is not None and nbytes >= self.max_bytes:
            return False
        if self.dtypes and dtype not in self.dtypes:
            return False
        return (_within(sum(ranks_per_node), self.world) and _within(len(ranks_per_node), self.nodes)
                and all(_within(k, self.ranks_per_node) for k in ranks_per_node))

    def describe(self) -> str:
        size = f"[{_bytes(self.min_bytes)}, {_bytes(self.max_bytes) if self.max_bytes is not None else 'inf'})"
        where = [f"{name} {lo}..{'' if hi is None else hi}" for name, b in
                 (("world", self.world), ("nodes", self.nodes), ("ranks/node", self.ranks_per_node))
                 if b is not None for lo, hi in [b]]
        if self.dtypes:
            where.append("/".join(self.dtypes))
        return f"{self.collective} {size}{' ' + ', '.join(where) if where else ''} -> {self.algorithm}"


def _within(value: int, bounds: Optional[Bounds]) -> bool:
    if bounds is None:
        return True
    lo, hi = bounds
    return value >= lo and (hi is None or value <= hi)


def _bytes(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


@dataclasses.dataclass(frozen=True)
class TuningTable:
    rows: tuple[Row, ...]
    source: str = ""        # where it came from: a file's path, or "default"
    fingerprint: str = ""   # the topology it was measured on ("" for any)
    meta: Any = None        # the rest of the file's header (engine, date, ...), kept for readers
    compression: tuple[dict, ...] = ()          # measured compressed all-reduces (see the module docstring)
    compression_error: Any = None               # {family: typical relative error}

    def then(self, other: "TuningTable") -> "TuningTable":
        """This table's rows, then ``other``'s where none of these matched (its
        measurements of compression, else ``other``'s; typical errors likewise)."""
        return TuningTable(self.rows + other.rows, f"{self.source} then {other.source}", self.fingerprint,
                           self.meta, self.compression or other.compression,
                           self.compression_error or other.compression_error)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "source": self.source,
                               "fingerprint": self.fingerprint}
        if self.meta:
            out.update(self.meta)
        out["rows"] = [_row_json(r) for r in self.rows]
        if self.compression:
            out["compression"] = list(self.compression)
        if self.compression_error:
            out["compression_error"] = dict(self.compression_error)
        return out

    def dump(self, path: str | os.PathLike) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)


def _row_json(r: Row) -> dict[str, Any]:
    out: dict[str, Any] = {"collective": r.collective, "algorithm": r.algorithm, "min_bytes": r.min_bytes,
                           "max_bytes": r.max_bytes}
    for name in ("dtypes", "world", "nodes", "ranks_per_node", "note", "measured"):
        value = getattr(r, name)
        if value:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _bounds(raw: Any, where: str) -> Optional[Bounds]:
    if raw is None:
        return None
    if (not isinstance(raw, list) or len(raw) != 2 or not isinstance(raw[0], int)
            or not (raw[1] is None or isinstance(raw[1], int)) or (raw[1] is not None and raw[1] < raw[0])):
        raise ValueError(f"{where}: expected [low, high] with integers low <= high (high may be null), got {raw!r}")
    return raw[0], raw[1]


def _row(raw: Any, i: int, source: str) -> Row:
    where = f"rows[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    collective = raw.get("collective")
    if collective not in COLLECTIVES:
        raise ValueError(f"{where}.collective: {collective!r} is not one of {', '.join(COLLECTIVES)}")
    algorithm = raw.get("algorithm")
    if algorithm not in names(collective) or algorithm == AUTO:
        raise ValueError(f"{where}.algorithm: {algorithm!r} is not an algorithm of {collective} "
                         f"({', '.join(a for a in names(collective) if a != AUTO)})")
    lo, hi = raw.get("min_bytes", 0), raw.get("max_bytes")
    if not isinstance(lo, int) or lo < 0 or not (hi is None or (isinstance(hi, int) and hi > lo)):
        raise ValueError(f"{where}: min_bytes {lo!r} and max_bytes {hi!r} must be integers, 0 <= min < max "
                         f"(max may be null)")
    dtypes = raw.get("dtypes") or []
    if not isinstance(dtypes, list) or not all(isinstance(d, str) for d in dtypes):
        raise ValueError(f"{where}.dtypes: expected a list of dtype names, got {dtypes!r}")
    note = raw.get("note", "")
    return Row(collective, algorithm, lo, hi, tuple(dtypes), _bounds(raw.get("world"), f"{where}.world"),
               _bounds(raw.get("nodes"), f"{where}.nodes"),
               _bounds(raw.get("ranks_per_node"), f"{where}.ranks_per_node"), str(note), raw.get("measured"),
               source, i)


def parse(doc: Any, source: str) -> TuningTable:
    """A table from its JSON document; ``ValueError`` naming the field that is wrong."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a tuning table (expected \"format\": \"{FORMAT}\")")
    version = doc.get("version")
    if not isinstance(version, int):
        raise ValueError(f"version: expected an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"format version {version} is newer than this fmcomm reads ({FORMAT_VERSION}); "
                         f"upgrade fmcomm or re-run fmcomm tune")
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise ValueError("rows: expected a list")
    fingerprint = doc.get("fingerprint", "")
    meta = {k: v for k, v in doc.items()
            if k not in ("format", "version", "rows", "source", "fingerprint", "compression", "compression_error")}
    measured = doc.get("compression", [])
    if not isinstance(measured, list):
        raise ValueError("compression: expected a list")
    errors = doc.get("compression_error") or {}
    if not isinstance(errors, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in errors.values()):
        raise ValueError("compression_error: expected {family: relative error >= 0}")
    return TuningTable(tuple(_row(r, i, source) for i, r in enumerate(rows)), source, str(fingerprint or ""),
                       meta or None, tuple(_measured_compression(m, i) for i, m in enumerate(measured)),
                       errors or None)


def _measured_compression(raw: Any, i: int) -> dict:
    where = f"compression[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object")
    from .. import compression
    from ..errors import InvalidArgument
    try:
        compression.parse(raw.get("spec"))
    except InvalidArgument as e:
        raise ValueError(f"{where}.spec: {e}") from None
    for field in ("bytes", "median_us", "rel_error"):
        value = raw.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{where}.{field}: expected a number >= 0, got {value!r}")
    return raw


def load(path: str | os.PathLike) -> TuningTable:
    """Read a tuning table; :class:`TuningFileError` naming ``path`` and the problem."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise TuningFileError(str(path), f"cannot be read ({e.strerror or e})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise TuningFileError(str(path), f"is not valid JSON (line {e.lineno}: {e.msg})") from None
    try:
        return parse(doc, str(path))
    except ValueError as e:
        raise TuningFileError(str(path), str(e)) from None


log = logging.getLogger("fmcomm")


def cache_path(fingerprint: str) -> Path:
    """Where ``fmcomm tune`` keeps the table of the machine with this topology fingerprint."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fmcomm" / f"tuning-{fingerprint}.json"


def active(path: str, fingerprint: str = "") -> TuningTable:
    """What ``auto`` follows: a measured table before the default table.

    The measured table is the one at ``path`` (``FMCOMM_TUNING_FILE``), else the one
    ``fmcomm tune`` cached for ``fingerprint``, if there is one. A table that cannot be
    read, is of a newer format version, or was measured on another machine (its
    fingerprint differs) is passed over with one warning per process naming the file
    and the problem: the default table then covers every call.
    """
    if not path and fingerprint and cache_path(fingerprint).exists():
        path = str(cache_path(fingerprint))
    if not path:
        return _DEFAULT
    return _measured_then_default(path, fingerprint)


@functools.lru_cache(maxsize=16)
def _measured_then_default(path: str, fingerprint: str) -> TuningTable:
    try:
        table = load(path)
    except TuningFileError as e:
        log.warning("%s; auto follows the default table instead", e)
        return _DEFAULT
    if fingerprint and table.fingerprint and table.fingerprint != fingerprint:
        log.warning("tuning table %s was measured on another machine (topology fingerprint %s, this one %s); "
                    "auto follows the default table instead (re-run fmcomm tune here)", path, table.fingerprint,
                    fingerprint)
        return _DEFAULT
    return _relabel(table, f"tuning table {path}").then(_DEFAULT)


def digest(table: TuningTable) -> int:
    """A 62-bit number naming the table's rows, for ranks to check they follow one table."""
    text = json.dumps([_row_json(r) for r in table.rows], sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


def default_table() -> TuningTable:
    """The rules shipped with fmcomm, each row with its source (``default_table.json``)."""
    return _DEFAULT


def _relabel(table: TuningTable, source: str) -> TuningTable:
    rows = tuple(dataclasses.replace(r, origin=source, index=r.index) for r in table.rows)
    return dataclasses.replace(table, rows=rows, source=source)


DEFAULT_ORIGIN = "default table"
_DEFAULT = _relabel(load(DEFAULT_TABLE), DEFAULT_ORIGIN)
