"""The machine presets in topology/: every one loads, every figure names its source,
and they ship with the package."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fmcomm.errors import InvalidArgument, TopologyError
from fmcomm.topology import Topology, presets
from fmcomm.topology.model import SOURCES

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {"dgx-h100", "dgx-a100", "pcie-8gpu", "cpu-100gbe", "emulated-2x2-1gbit"}


def test_the_presets_the_issue_names_are_there():
    assert EXPECTED <= set(presets.names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_figure_has_a_source_and_a_note(name):
    data = json.loads((ROOT / "topology" / f"{name}.json").read_text())
    figures = [f for lv in data["levels"].values() for f in lv.values()] + list(data["kernels"].values())
    assert len(figures) == 8  # alpha, bandwidth, node bandwidth for both levels; reduce and copy
    for f in figures:
        assert f["source"] in SOURCES and len(f["note"]) > 20, f
    assert data["node"]["source"] in SOURCES and data["node"]["note"]
    topo = presets.load(name)
    assert topo.name == name and {lv.name for lv in topo.levels} == {"intra", "inter"} and topo.kernels


def test_published_figures_are_the_ones_in_the_presets():
    h100, a100 = presets.load("dgx-h100"), presets.load("dgx-a100")
    assert h100.level("inter").bandwidth.value == 47e9 and "nccl-tests#290" in h100.level("inter").bandwidth.note
    assert len(h100.node_facts[0].nics) == 8 and all(n.speed_mbps == 400000 for n in h100.node_facts[0].nics)
    assert all(n.speed_mbps == 200000 for n in a100.node_facts[0].nics)
    assert h100.node_facts[0].gpu_paths[0][1] == "NV18" and a100.node_facts[0].gpu_paths[0][1] == "NV12"
    assert "NV" not in "".join(p for row in presets.load("pcie-8gpu").node_facts[0].gpu_paths for p in row)
    assert presets.load("cpu-100gbe").node_facts[0].gpus == ()
    emu = presets.load("emulated-2x2-1gbit")
    assert emu.node_of == (0, 0, 1, 1) and emu.level("inter").bandwidth.source == "measured"
    assert emu.level("inter").bandwidth.spread is not None


def test_resize_makes_any_number_of_equal_nodes():
    big = presets.resize(presets.load("dgx-h100"), 512)
    assert big.world == 4096 and big.nodes == 512 and big.ranks_on(511) == tuple(range(4088, 4096))
    assert len(big.node_facts) == 512 and big.levels == presets.load("dgx-h100").levels
    with pytest.raises(InvalidArgument, match="nodes of"):
        presets.resize(Topology((0, 0, 1)), 4)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(TopologyError, match="no preset named 'dgx-z'.*dgx-h100"):
        presets.load("dgx-z")


def test_presets_ship_with_the_package(tmp_path):
    # build_py copies the package as a wheel would; the presets must come along.
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    shipped = {p.stem for p in (tmp_path / "fmcomm" / "_presets").glob("*.json")}
    assert shipped == set(presets.names())
    assert (tmp_path / "fmcomm" / "tuning" / "default_table.json").exists()  # the rules auto follows
