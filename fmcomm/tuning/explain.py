"""What the cost model predicts for each candidate of one collective at one size,
and which it would pick (``fmcomm topo --explain all_reduce 16M``)."""
from __future__ import annotations

from ..dtypes import DTYPES
from ..topology.describe import rate, seconds
from ..topology.model import Topology


def explain(topo: Topology, collective: str, nbytes: int, dtype: str = "float32", table=None,
            engine_has_native: bool = True) -> str:
    """The cost model's prediction for each candidate, then what ``auto`` chooses and why
    (``table``: the tuning table auto follows; default: the one for this topology)."""
    from ..simulator import predict
    from . import table as tables
    from .select import Request, select
    rows = predict(topo, collective, [nbytes], DTYPES[dtype])
    lines = [f"{collective} of {nbytes} bytes ({dtype}) on {topo.world} ranks, {topo.nodes} nodes:"]
    for r in sorted(rows, key=lambda r: r.seconds):
        lines.append(f"  {r.algo:>20}  {seconds(r.seconds):>10}  busbw {rate(r.busbw):>10}"
                     f"{'  <- picked' if r.picked else ''}{'' if r.exact else '  (estimate)'}")
    lines.append("  (native, the engine's own collective, is not a schedule: the cost model cannot price it)")
    table = table or tables.active("", topo.fingerprint())
    plan = select(Request(collective, nbytes, dtype, native=engine_has_native), topo, table)
    lines.append(f"auto runs {plan.algorithm}: {plan.reason}"
                 + ("" if engine_has_native else " (the engine has no native collective for it)"))
    return "\n".join(lines)
