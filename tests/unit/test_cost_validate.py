"""Predicted against measured (fmcomm.tuning.validate) on rows shaped as fmcomm bench --json writes them."""
from __future__ import annotations

import json

import pytest

from fmcomm.topology import presets
from fmcomm.tuning.cost import price
from fmcomm.tuning.validate import compare, main, report


def row(algo, nbytes, time_us, impl="fmcomm", inplace=False, world=4, collective="all_reduce"):
    return {"collective": collective, "impl": impl, "algo": algo, "bytes": nbytes, "dtype": "float32",
            "world": world, "inplace": inplace, "time_us": time_us}


def test_error_is_relative_to_the_measurement_and_engines_are_skipped():
    topo = presets.load("emulated-2x2-1gbit")
    predicted = price("all_reduce", "ring", topo, 1 << 24).seconds
    rows = [row("ring", 1 << 24, predicted * 1e6 / 1.25), row("native", 1 << 24, 1.0),
            row("MPI_Allreduce", 1 << 24, 1.0, impl="mpi"), row("ring", 1 << 24, 5.0, inplace=True)]
    cases = compare(rows, topo, placements=(False,))
    assert len(cases) == 1 and cases[0]["error"] == pytest.approx(0.25)
    assert "median |error| 25.0% over 1 cases" in report(cases)


def test_rows_of_another_world_are_refused():
    with pytest.raises(ValueError, match="8 ranks against a topology of 4"):
        compare([row("ring", 1 << 20, 100.0, world=8)], presets.load("emulated-2x2-1gbit"))


def test_command_line(tmp_path, capsys):
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [row("hierarchical", 1 << 24, 160000.0),
                                                       row("ring", 1 << 20, 15000.0, collective="all_gather")]))
    assert main([str(path), "--topology", "emulated-2x2-1gbit"]) == 0
    out = capsys.readouterr().out
    assert "hierarchical" in out and "all_gather" in out and "median |error|" in out


def test_compressed_rows_are_priced_from_their_plan():
    from fmcomm.tuning.plans import price_compressed_all_reduce
    topo = presets.load("emulated-2x2-1gbit")
    planned = price_compressed_all_reduce(topo, 1 << 24, "onebit@inter").seconds
    cases = compare([row("onebit@inter", 1 << 24, planned * 1e6 * 2)], topo)
    assert cases[0]["error"] == pytest.approx(-0.5)
