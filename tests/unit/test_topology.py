"""Topology detection (sysfs readers on fake trees, NVML through a fake module), the
fixed-size records and their exchange, and the machine file."""
from __future__ import annotations

import json
import os
import threading
import types
from pathlib import Path

import pytest

from fmcomm.errors import CommTimeoutError, MachineFileError, TopologyError
from fmcomm.topology import Figure, Level, Topology, detect, dump, load, local, machine_file, records
from fmcomm.topology.gpus import detect as detect_gpus, pci_class
from fmcomm.topology.model import Gpu, Kernels, Nic, NodeFacts, RankFacts


# ------------------------------------------------------------ fake machines

def write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def fake_sysfs(root: Path) -> Path:
    """Two sockets, two NUMA nodes of 4 CPUs, a 100G NIC on a PCIe switch, a virtio NIC, a down NIC."""
    write(root, "devices/system/cpu/online", "0-7\n")
    for c in range(8):
        write(root, f"devices/system/cpu/cpu{c}/topology/physical_package_id", f"{c // 4}\n")
    write(root, "devices/system/node/online", "0-1\n")
    write(root, "devices/system/node/node0/cpulist", "0-3\n")
    write(root, "devices/system/node/node1/cpulist", "4-7\n")
    nic_dev = root / "devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0"
    nic_dev.mkdir(parents=True)
    (nic_dev / "numa_node").write_text("0\n")
    gpu_dev = root / "devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0"
    gpu_dev.mkdir(parents=True)
    (gpu_dev / "numa_node").write_text("0\n")
    (root / "bus/pci/devices").mkdir(parents=True)
    os.symlink(gpu_dev, root / "bus/pci/devices/0000:02:01.0")
    for name, speed, state, dev in (("ib0", "100000", "up", nic_dev), ("eth0", "-1", "up", None),
                                    ("eth1", "1000", "down", None), ("lo", "", "unknown", None)):
        write(root, f"class/net/{name}/operstate", state + "\n")
        write(root, f"class/net/{name}/speed", speed + "\n")
        if dev is not None:
            os.symlink(dev, root / f"class/net/{name}/device")
    return root


class FakeNvml:
    """Two GPUs, each with 2 NVLinks to the other, and one to an NVSwitch-less nothing."""
    NVML_NVLINK_MAX_LINKS = 4
    NVML_FEATURE_ENABLED = 1
    buses = ["00000000:02:01.0", "00000000:83:00.0"]

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetPciInfo(self, h):
        return types.SimpleNamespace(busId=self.buses[h].encode())

    def nvmlDeviceGetName(self, h):
        return b"Fake H100"

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(total=80 << 30)

    def nvmlDeviceGetNvLinkState(self, h, link):
        if link >= 3:
            raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")
        return 1 if link < 2 else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        return types.SimpleNamespace(busId=self.buses[1 - h].encode())

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b):
        return 50


# ------------------------------------------------------------ local facts

def test_cpu_list_format():
    assert local.parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert local.parse_cpu_list("") == []


def test_node_facts_from_a_fake_sysfs(tmp_path):
    root = fake_sysfs(tmp_path)
    facts = local.node_facts("hostA", root)
    assert (facts.hostname, facts.sockets, facts.numa_nodes, facts.cpus) == ("hostA", 2, 2, 8)
    # Down NICs and loopback are left out; a virtio NIC's -1 is "unknown", not an error.
    assert [(n.name, n.speed_mbps, n.numa_node) for n in facts.nics] == [("eth0", -1, -1), ("ib0", 100000, 0)]
    assert facts.gpus == ()  # no nvidia-ml-py / no driver here: simply empty


def test_rank_facts_name_the_numa_node_of_the_allowed_cpus(tmp_path):
    root = fake_sysfs(tmp_path)
    assert local.rank_facts(root, allowed={5, 6}) == RankFacts(cores=2, numa_node=1)
    assert local.rank_facts(root, allowed={0, 1, 2}) == RankFacts(cores=3, numa_node=0)


def test_missing_sysfs_gives_unknowns_not_errors(tmp_path):
    facts = local.node_facts("h", tmp_path)
    assert (facts.sockets, facts.numa_nodes, facts.cpus, facts.nics) == (0, 0, 0, ())


def test_this_machine_detects_without_error():
    facts = local.node_facts("here")
    assert facts.cpus >= 1
    assert all(n.speed_mbps == -1 or n.speed_mbps > 0 for n in facts.nics)


@pytest.mark.parametrize("a, b, numa, expected", [
    ("/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0", "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.1",
     (0, 0), "PIX"),
    ("/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0",
     "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:03:00.0/0000:04:00.0", (0, 0), "PXB"),
    ("/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0", "/sys/devices/pci0000:00/0000:00:02.0/0000:05:00.0",
     (0, 0), "PHB"),
    ("/sys/devices/pci0000:00/0000:00:01.0", "/sys/devices/pci0000:40/0000:40:01.0", (0, 0), "NODE"),
    ("/sys/devices/pci0000:00/0000:00:01.0", "/sys/devices/pci0000:80/0000:80:01.0", (0, 1), "SYS"),
    ("/sys/devices/pci0000:00/0000:00:01.0", "", (0, 0), "SYS"),
])
def test_pci_path_classes(a, b, numa, expected):
    assert pci_class(a, b, *numa) == expected


def test_gpus_and_nvlinks_through_nvml(tmp_path):
    root = fake_sysfs(tmp_path)
    gpus, paths = detect_gpus(root, FakeNvml())
    assert [(g.index, g.name, g.memory_mib) for g in gpus] == [(0, "Fake H100", 80 << 10), (1, "Fake H100", 80 << 10)]
    assert gpus[0].numa_node == 0 and gpus[0].pci_path.endswith("0000:02:01.0")
    assert gpus[1].pci_path == ""  # not in this sysfs
    assert paths == (("X", "NV2"), ("NV2", "X"))


def test_gpus_without_nvlink_take_nvmls_pcie_level(tmp_path):
    class NoLinks(FakeNvml):
        def nvmlDeviceGetNvLinkState(self, h, link):
            return 0
    _, paths = detect_gpus(fake_sysfs(tmp_path), NoLinks())
    assert paths == (("X", "SYS"), ("SYS", "X"))


def test_a_failing_driver_means_no_gpus(tmp_path):
    class Broken(FakeNvml):
        def nvmlDeviceGetCount(self):
            raise RuntimeError("NVML_ERROR_DRIVER_NOT_LOADED")
    assert detect_gpus(tmp_path, Broken()) == ((), ())


# ------------------------------------------------------------ records

def sample_node() -> NodeFacts:
    return NodeFacts(hostname="nodé-1", sockets=2, numa_nodes=2, cpus=128,
                     nics=(Nic("mlx5_0", 400000, 0), Nic("eth0", -1, -1)),
                     gpus=(Gpu(0, "NVIDIA H100 80GB HBM3", 81559, 0), Gpu(1, "NVIDIA H100 80GB HBM3", 81559, 1)),
                     gpu_paths=(("X", "NV18"), ("NV18", "X")), gpu_nic_paths=(("PIX", "SYS"), ("SYS", "SYS")))


def test_record_round_trip():
    raw = records.pack(12345, sample_node(), RankFacts(cores=16, numa_node=1))
    assert len(raw) == records.RECORD_WORDS * 8
    key, node, rank = records.unpack(raw, 3)
    assert (key, rank) == (12345, RankFacts(16, 1))
    assert node == sample_node()


def test_record_with_a_bad_count_or_version_is_refused():
    raw = bytearray(records.pack(1, sample_node(), RankFacts(1, 0)))
    bad = bytearray(raw)
    bad[0] = 9  # version
    with pytest.raises(TopologyError, match="rank 2.*version 9"):
        records.unpack(bytes(bad), 2)
    bad = bytearray(raw)
    bad[records._HEAD.size - 1] = 200  # GPU count beyond MAX_GPUS
    with pytest.raises(TopologyError, match="rank 5.*out-of-range"):
        records.unpack(bytes(bad), 5)
    with pytest.raises(TopologyError, match="bytes"):
        records.unpack(bytes(raw[:-8]), 0)


def test_long_names_are_cut_on_a_character_boundary():
    node = NodeFacts(hostname="é" * 40)
    _, back, _ = records.unpack(records.pack(1, node, RankFacts()), 0)
    assert back.hostname == "é" * 32


# ------------------------------------------------------------ exchange

class ThreadTransport:
    """Ranks as threads; native_all_reduce sums every rank's tensor (enough for detection)."""

    def __init__(self, shared, rank, world):
        self.shared, self.rank, self.world, self.name = shared, rank, world, "threads"

    def native_all_reduce(self, inp, out, dtype, op):
        sh = self.shared
        with sh["lock"]:
            sh["parts"][self.rank] = inp.clone()
        sh["barrier"].wait()
        total = sum(sh["parts"].values())
        sh["barrier"].wait()
        out.copy_(total)
        return None

    def wait(self, reqs, deadline):
        return True


def run_ranks(world, fn):
    shared = {"lock": threading.Lock(), "parts": {}, "barrier": threading.Barrier(world)}
    results, errors = [None] * world, []

    def body(r):
        try:
            results[r] = fn(ThreadTransport(shared, r, world))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results


def test_detect_groups_ranks_by_node_name_and_agrees_everywhere(tmp_path):
    names = ["b", "a", "b", "c", "a"]
    topos = run_ranks(5, lambda t: detect(t, names[t.rank], 10, topo_file="", sysfs=fake_sysfs(tmp_path / str(t.rank))))
    assert all(t == topos[0] for t in topos)
    topo = topos[0]
    assert topo.node_of == (0, 1, 0, 2, 1)
    assert topo.nodes == 3 and topo.ranks_on(1) == (1, 4) and topo.local_rank(4) == 1
    assert [n.hostname for n in topo.node_facts] == ["b", "a", "c"]
    assert topo.node_facts[0].nics[1] == Nic("ib0", 100000, 0)
    assert len(topo.rank_facts) == 5 and all(r.cores >= 1 for r in topo.rank_facts)


def test_detect_reports_a_rank_that_never_joins():
    class Late(ThreadTransport):
        def native_all_reduce(self, inp, out, dtype, op):
            return "pending"

        def wait(self, reqs, deadline):
            return False
    with pytest.raises(CommTimeoutError, match="rank 0.*topology"):
        detect(Late({}, 0, 2), "x", 0.01, topo_file="")


def test_from_keys_and_node_helpers_keep_their_old_meaning():
    topo = Topology.from_keys([7, 7, 3, 3, 9])
    assert topo.node_of == (0, 0, 1, 1, 2)
    assert topo.nodes == 3 and topo.ranks_on(1) == (2, 3) and topo.local_rank(3) == 1
    assert topo.groups() == [[0, 1], [2, 3], [4]]
    assert local.node_name("given") == "given" and local.node_name("") != ""


# ------------------------------------------------------------ machine file

def figured() -> Topology:
    lv = lambda name, a, b, nb: Level(name, Figure(a, "measured", "ping-pong", 0.05),  # noqa: E731
                                      Figure(b, "measured", "streams"), Figure(nb, "preset", "2 NICs"))
    return Topology((0, 0, 1, 1), node_facts=(sample_node(), sample_node()),
                    rank_facts=(RankFacts(4, 0),) * 4,
                    levels=(lv("intra", 2e-6, 1e10, 4e10), lv("inter", 2e-5, 1.2e8, 1.2e8)),
                    kernels=Kernels(Figure(2e9, "measured", "kernels.py"), Figure(6.9e9, "measured")),
                    name="test", description="two nodes")


def test_machine_file_round_trip(tmp_path):
    path = tmp_path / "m.json"
    dump(figured(), str(path))
    back = load(str(path))
    assert back == figured()
    data = json.loads(path.read_text())
    assert data["version"] == machine_file.FORMAT_VERSION
    assert data["levels"]["inter"]["alpha_s"] == {"value": 2e-5, "source": "measured", "note": "ping-pong",
                                                  "spread": 0.05}


def edit(tmp_path, change) -> str:
    data = machine_file.to_dict(figured())
    change(data)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_newer_format_is_refused_naming_file_and_version(tmp_path):
    path = edit(tmp_path, lambda d: d.update(version=machine_file.FORMAT_VERSION + 1))
    with pytest.raises(MachineFileError, match=rf"{path}: format version 2 is newer") as e:
        load(path)
    assert e.value.path == path


@pytest.mark.parametrize("change, problem", [
    (lambda d: d["levels"]["inter"]["bandwidth_Bps"].update(source="guessed"), r"levels.inter.bandwidth_Bps.source"),
    (lambda d: d["levels"]["intra"]["alpha_s"].pop("value"), r"levels.intra.alpha_s.value: missing"),
    (lambda d: d["levels"]["intra"]["bandwidth_Bps"].update(value=0), r"bandwidth_Bps.value: 0 is not a positive"),
    (lambda d: d["levels"].update(socket={}), r"levels.socket: unknown level"),
    (lambda d: d["layout"].update(node_of="0,0"), r"layout.node_of: expected list"),
    (lambda d: d.update(nodes=d["nodes"][:1]), r"nodes: 1 entries for 2 nodes"),
    (lambda d: d["nodes"][1]["nics"][0].update(speed_mbps="fast"), r"nodes\[1\].nics\[0\].speed_mbps"),
    (lambda d: d.update(format="nccl-topo"), r"format: 'nccl-topo'"),
])
def test_corrupt_fields_are_named(tmp_path, change, problem):
    path = edit(tmp_path, change)
    with pytest.raises(MachineFileError, match=problem):
        load(path)


def test_files_that_are_not_json_or_not_there(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "fmcomm-machine", "version": 1,')
    with pytest.raises(MachineFileError, match=rf"{bad}: not valid JSON: .* line 1"):
        load(str(bad))
    with pytest.raises(MachineFileError, match="cannot read it"):
        load(str(tmp_path / "absent.json"))


def test_topo_file_supplies_figures_and_node_facts(tmp_path):
    path = tmp_path / "m.json"
    dump(figured(), str(path))
    topos = run_ranks(2, lambda t: detect(t, f"n{t.rank}", 10, topo_file=str(path), sysfs=tmp_path / "empty"))
    topo = topos[0]
    assert topo.node_of == (0, 1)
    assert topo.levels == figured().levels and topo.kernels == figured().kernels and topo.name == "test"
    assert topo.node_facts == (sample_node(), sample_node())  # one kind of node in the file: every node is it


def test_topo_file_from_the_environment_is_refused_before_any_exchange(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    monkeypatch.setenv("FMCOMM_TOPO_FILE", str(bad))
    with pytest.raises(MachineFileError, match=str(bad)):
        detect(ThreadTransport({}, 0, 2), "x", 10)  # its shared state is empty: entering the exchange would fail


def test_level_lookup_says_what_is_missing():
    with pytest.raises(TopologyError, match="no figures for the inter level"):
        Topology((0, 1)).level("inter")
    assert figured().level_between(0, 2).name == "inter" and figured().level_between(2, 3).name == "intra"

