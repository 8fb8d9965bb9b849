"""One configuration object for fmcomm.

Every option has a name, a type, a default and a one-line description, all listed in
:data:`OPTIONS`. The environment variable of option ``name`` is ``FMCOMM_<NAME>``
(upper case). An ``FMCOMM_*`` variable that names no option, or a value that does not
parse, is a :class:`~fmcomm.errors.ConfigError`: a typo must not silently fall back to
a default. The option table of docs/configuration.md is generated from the same list
(``python -m fmcomm.config``), so the two cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping

from .errors import ConfigError

ENV_PREFIX = "FMCOMM_"

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse a byte count such as ``4096``, ``4K``, ``64M``, ``1G`` (binary units)."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must be >= 0, got {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"cannot parse size {text!r}: expected an integer with an optional K/M/G/T suffix")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"cannot parse boolean {text!r}: use 1/0, true/false, yes/no or on/off")


def _parse_positive_float(text: str | float) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"cannot parse number {text!r}") from None
    if not v > 0:
        raise ConfigError(f"must be > 0, got {text!r}")
    return v


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(text: Any) -> str:
        t = str(text).strip().lower()
        if t not in allowed:
            raise ConfigError(f"{text!r} is not one of {', '.join(allowed)}")
        return t
    parse.choices = allowed  # type: ignore[attr-defined]
    return parse


def _parse_algo(text: Any) -> str:
    # One name (used by every collective that has an algorithm of that name, the
    # others choosing automatically) or, as NCCL_ALGO, per collective:
    # "all_reduce:ring;broadcast:chain". Names are checked against the registry when
    # a collective runs; here only the shape.
    t = str(text).strip().lower()
    name = r"[a-z][a-z0-9_]*"
    if not (re.fullmatch(name, t) or re.fullmatch(rf"{name}:{name}(;{name}:{name})*;?", t)):
        raise ConfigError(f"{text!r} is not an algorithm name or a list like all_reduce:ring;broadcast:chain")
    return t


def _parse_positive_size(text: Any) -> int:
    v = parse_size(text)
    if v <= 0:
        raise ConfigError(f"must be > 0, got {text!r}")
    return v


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    doc: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("algo", "auto", _parse_algo,
           "Algorithm unless a call passes `algo=`: `auto`, `native` or a schedule's name (docs/algorithms.md), "
           "used by every collective that has it; or per collective, "
           "`all_reduce:ring;broadcast:chain`."),
    Option("transport", "auto", _choice("auto", "mpi", "torch"),
           "Engine that moves the bytes. `auto`: an existing torch.distributed group if one is "
           "initialized, else MPI when launched by mpiexec/mpirun/srun, else torch.distributed."),
    Option("timeout", 300.0, _parse_positive_float,
           "Seconds any one wait (a receive, a send, a native collective) may take before "
           "`CommTimeoutError` names the operation, its sequence number and the peer."),
    Option("log_level", "warning", _choice("debug", "info", "warning", "error"),
           "Level of the `fmcomm` logger."),
    Option("segment_bytes", 1 << 20, _parse_positive_size,
           "Messages larger than this are cut into segments of this size; each segment is reduced "
           "as soon as it arrives, while later segments are still in flight."),
    Option("native", "auto", _choice("auto", "on", "off"),
           "Native CPU kernels (`fmcomm._C`). `auto`: use them when built; `on`: fail if not built; "
           "`off`: always use the torch fallback."),
    Option("check", True, _parse_bool,
           "Before each collective, every rank agrees on it (operation, sequence number, count, "
           "dtype, reduction, algorithm or compressor, root) in one small all-reduce of the engine's, "
           "so ranks that disagree all get `MismatchError` instead of a hang or a wrong result."),
    Option("node_id", "", str,
           "Name of the node this rank runs on; empty: the hostname. Ranks with one name share a node."),
    Option("nan", "propagate", _choice("propagate", "raise"),
           "A NaN or infinity in any rank's input to a compressed all-reduce. `propagate`: that call "
           "runs uncompressed, so the value reaches every rank's output identically, and its key's "
           "error-feedback residuals start afresh; `raise`: every rank raises `NonFiniteError` instead "
           "(at the cost of an agreement round before every compressed call)."),
    Option("shm", "auto", _choice("auto", "off"),
           "Intra-node steps (reduce-scatter, all-gather of compressed sums) of `@inter` compressed all-reduces. `auto`: "
           "the ranks of a node move them through a /dev/shm segment when every rank of the node can "
           "map it, else through the transport; `off`: always through the transport."),
    Option("topo_file", "", str,
           "A machine file (`fmcomm topo --dump FILE`, or a preset in `topology/`) whose figures (latency "
           "and bandwidth per level, kernel rates) and node facts stand in for detection; empty: detect. "
           "A file of a newer format version or one that does not parse is refused with `MachineFileError`."),
    Option("tuning_file", "", str,
           "A tuning table (`fmcomm tune`) whose rows `auto` follows before fmcomm's default table "
           "(`fmcomm/tuning/default_table.json`); empty: the default table only. A table that cannot be "
           "read or is of a newer format version is passed over with one warning."),
)

_BY_NAME = {o.name: o for o in OPTIONS}


@dataclasses.dataclass(frozen=True)
class Config:
    algo: str = "auto"
    transport: str = "auto"
    timeout: float = 300.0
    log_level: str = "warning"
    segment_bytes: int = 1 << 20
    native: str = "auto"
    check: bool = True
    node_id: str = ""
    nan: str = "propagate"
    shm: str = "auto"
    topo_file: str = ""
    tuning_file: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Config":
        """Defaults, then ``FMCOMM_*`` variables, then explicit keyword overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX):].lower()
            opt = _BY_NAME.get(name)
            if opt is None:
                known = ", ".join(o.env for o in OPTIONS)
                raise ConfigError(f"unknown environment variable {key}; fmcomm knows {known}")
            try:
                values[name] = opt.parse(raw)
            except ConfigError as e:
                raise ConfigError(f"{key}={raw!r}: {e}") from None
        for name, raw in overrides.items():
            if raw is None:
                continue
            opt = _BY_NAME.get(name)
            if opt is None:
                raise ConfigError(f"unknown option {name!r}; options are {', '.join(_BY_NAME)}")
            try:
                values[name] = opt.parse(raw)
            except ConfigError as e:
                raise ConfigError(f"option {name}={raw!r}: {e}") from None
        return cls(**values)

    def replace(self, **changes: Any) -> "Config":
        return Config.from_env({}, **{**dataclasses.asdict(self), **changes})


# The dataclass defaults and OPTIONS must agree; checked at import so they cannot drift.
assert {f.name: f.default for f in dataclasses.fields(Config)} == {o.name: o.default for o in OPTIONS}


def markdown_table() -> str:
    """The option table of docs/configuration.md."""
    rows = ["| option | environment | default | meaning |", "|---|---|---|---|"]
    for o in OPTIONS:
        default = o.default
        if o.name == "segment_bytes":
            default = f"{default >> 20}M"
        rows.append(f"| `{o.name}` | `{o.env}` | `{default}` | {o.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
