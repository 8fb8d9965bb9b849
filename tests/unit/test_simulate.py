"""The simulator's pricing half and ``fmcomm simulate``/``fmcomm topo --explain``."""
from __future__ import annotations

import json

import pytest

from fmcomm import cli
from fmcomm.algorithms import REGISTRY
from fmcomm.dtypes import DTYPES
from fmcomm.errors import InvalidArgument
from fmcomm.simulator import predict, sizes, table
from fmcomm.topology import dump, presets
from fmcomm.topology.describe import rate

COLLECTIVES = sorted({c for c, _ in REGISTRY})


def test_sizes_follow_nccl_tests_flags():
    assert sizes(1024, 8192) == [1024, 2048, 4096, 8192]
    assert sizes(1, 100, 10) == [1, 10, 100]
    with pytest.raises(InvalidArgument):
        sizes(0, 10)


@pytest.mark.parametrize("preset", sorted(presets.names()))
@pytest.mark.parametrize("collective", COLLECTIVES)
def test_every_collective_on_every_preset(preset, collective):
    topo = presets.resize(presets.load(preset), 4)
    rows = predict(topo, collective, sizes(1 << 10, 1 << 22, 16), DTYPES["float32"])
    names = {a for c, a in REGISTRY if c == collective}
    assert {r.algo for r in rows} == names
    for size in {r.nbytes for r in rows}:
        here = [r for r in rows if r.nbytes == size]
        assert sum(r.picked for r in here) == 1
        assert min(here, key=lambda r: r.seconds).picked
        assert all(r.seconds > 0 for r in here)


def test_bigger_messages_never_take_less_time():
    topo = presets.resize(presets.load("dgx-a100"), 16)
    rows = predict(topo, "all_reduce", sizes(1 << 10, 1 << 30, 4), DTYPES["bfloat16"])
    for algo in {r.algo for r in rows}:
        times = [r.seconds for r in rows if r.algo == algo]
        assert times == sorted(times), algo


def test_table_has_nccl_tests_columns_and_a_pick():
    topo = presets.load("emulated-2x2-1gbit")
    text = table(predict(topo, "all_reduce", [1 << 24], DTYPES["float32"]), topo)
    assert "algbw" in text and "busbw" in text and text.count("*") == 1


def test_cli_simulate_writes_json_and_takes_a_dumped_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.json"
    dump(presets.load("dgx-h100"), str(path))
    out = tmp_path / "rows.jsonl"
    assert cli.main(["simulate", "--topology", str(path), "--nodes", "64", "-b", "1M", "-e", "4M",
                     "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["ranks"] for r in rows} == {512} and len(rows) == 3 * 5
    assert "priced in" in capsys.readouterr().out
    monkeypatch.setenv("FMCOMM_TOPO_FILE", str(path))
    assert cli.main(["simulate", "--op", "all_gather", "-b", "64K", "-e", "64K"]) == 0
    assert "all_gather" in capsys.readouterr().out


def test_cli_simulate_without_a_machine_says_what_to_give(capsys, monkeypatch):
    monkeypatch.delenv("FMCOMM_TOPO_FILE", raising=False)
    assert cli.main(["simulate"]) == 2
    assert "dgx-h100" in capsys.readouterr().err


def test_cli_topo_explain_on_a_preset(capsys):
    assert cli.main(["topo", "--topology", "emulated-2x2-1gbit", "--explain", "all_reduce", "16M"]) == 0
    text = capsys.readouterr().out
    inter = presets.load("emulated-2x2-1gbit").level("inter").bandwidth.value
    assert "<- picked" in text and "hierarchical" in text and rate(inter) in text


def test_simulate_prices_compression_beside_the_schedules(capsys):
    assert cli.main(["simulate", "--topology", "emulated-2x2-1gbit", "-b", "16M", "-e", "16M",
                     "--compress", "onebit@inter,fp8@inter"]) == 0
    out = capsys.readouterr().out
    assert "onebit@inter" in out and "fp8:e4m3@inter" in out and "hierarchical" in out
    with pytest.raises(InvalidArgument, match="float32 all_reduce only"):
        predict(presets.load("emulated-2x2-1gbit"), "all_gather", [1 << 20], DTYPES["float32"], compress=["fp8"])
