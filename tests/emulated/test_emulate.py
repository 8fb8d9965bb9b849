"""benchmarks/emulate.py: jobs across emulated nodes (network namespaces on a bridge).

Needs root and working `ip netns`; skipped otherwise. Every job is small: 2 nodes of
2 ranks, well under a minute each on 2 cores.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EMULATE = ROOT / "benchmarks" / "emulate.py"
PROGRAM = Path(__file__).resolve().parent / "rank_program.py"
MIB = 1 << 20


def _why_no_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs iproute2's ip and util-linux's unshare"
    probe = f"fmcomm-probe-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


WHY_NOT = _why_no_netns()
needs_netns = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


def _mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def run_emulate(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    """emulate.py with these arguments; on a timeout it gets SIGTERM, so it still cleans up."""
    proc = subprocess.Popen([sys.executable, str(EMULATE), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment())
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"emulate.py {' '.join(args)} ran past {timeout}s\n{out[-3000:]}\n{err[-3000:]}")
    except BaseException:  # pytest-timeout's, or a Ctrl-C: emulate.py still gets to clean up
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_id_of(stderr: str) -> str:
    m = re.search(r"emulate: (fmemu-[0-9a-f]{6}):", stderr)
    assert m, f"emulate.py named no run:\n{stderr[-3000:]}"
    return m.group(1)


def namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def assert_nothing_left(run_id: str) -> None:
    assert namespaces(run_id) == []
    assert not list(Path("/dev/shm").glob(run_id + "*"))
    assert not (Path("/etc/netns").exists() and list(Path("/etc/netns").glob(run_id + "*")))
    assert not list(Path("/run/fmcomm-emulate").glob(run_id + "*"))


def reports(out_dir: Path, proc: subprocess.CompletedProcess, world: int) -> list[dict]:
    got = []
    for r in range(world):
        f = out_dir / f"rank{r}.json"
        assert f.exists(), (f"rank {r} wrote no report (exit {proc.returncode})\n"
                            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
        got.append(json.loads(f.read_text()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return got


def check_two_by_two(reps: list[dict], transport: str) -> None:
    assert [r["rank"] for r in reps] == [0, 1, 2, 3]
    for r, rep in enumerate(reps):
        env = rep["env"]
        assert env["RANK"] == str(r) and env["WORLD_SIZE"] == "4"
        assert env["LOCAL_RANK"] == str(r % 2) and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "198.18.0.1" and env["MASTER_PORT"]
        assert env["GLOO_SOCKET_IFNAME"] == "eth0"
        assert env["FMCOMM_NODE_ID"] is None  # node membership comes from the hostname alone
        assert rep["world"] == rep["fmcomm_world"] == 4 and rep["fmcomm_rank"] == r
        assert rep["gloo_ok"] and rep["fmcomm_ok"]
        assert rep["fmcomm_transport"] == transport
        assert rep["hostname"] == f"node{r // 2}"  # ranks fill node 0, then node 1
    assert len({rep["hostname"] for rep in reps}) == 2


@needs_netns
@pytest.mark.timeout(180)
def test_torch_transport_two_nodes(tmp_path):
    proc = run_emulate("--nodes", "2", "--per-node", "2", "--transport", "torch", "--",
                       sys.executable, str(PROGRAM), "--out", str(tmp_path))
    check_two_by_two(reports(tmp_path, proc, 4), "torch")
    assert_nothing_left(run_id_of(proc.stderr))


@needs_netns
@pytest.mark.timeout(180)
def test_mpi_transport_two_nodes(tmp_path):
    if _mpiexec() is None:
        pytest.skip("mpiexec not found (pip install mpi4py mpich)")
    proc = run_emulate("--nodes", "2", "--per-node", "2", "--transport", "mpi", "--rate", "1gbit", "--",
                       sys.executable, str(PROGRAM), "--out", str(tmp_path), "--mpi", "--big-bytes", str(4 * MIB))
    reps = reports(tmp_path, proc, 4)
    check_two_by_two(reps, "mpi")
    for r, rep in enumerate(reps):
        assert rep["mpi_rank"] == r and rep["mpi_world"] == 4
        assert rep["mpi_big"]["ok"] and rep["gloo_big"]["ok"]
    # A real MPI job across the nodes: MPI_Allreduce's bytes crossed eth0 (not shared
    # memory or CMA, which UCX takes by default between processes of one machine).
    assert max(rep["mpi_big"]["tx_bytes"] for rep in reps) >= 4 * MIB, [rep["mpi_big"] for rep in reps]
    assert_nothing_left(run_id_of(proc.stderr))


@needs_netns
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["torch", "mpi"])
def test_failing_command_returns_its_code_and_leaves_nothing(transport):
    if transport == "mpi" and _mpiexec() is None:
        pytest.skip("mpiexec not found")
    proc = run_emulate("--nodes", "2", "--per-node", "2", "--transport", transport, "--", "false")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert_nothing_left(run_id_of(proc.stderr))
    proc = run_emulate("--nodes", "2", "--per-node", "1", "--transport", transport, "--",
                       "sh", "-c", 'test "$RANK" = 1 && exit 7; exit 0')
    assert proc.returncode == 7, proc.stderr[-3000:]
    assert_nothing_left(run_id_of(proc.stderr))


def _start_sleeping_run(transport: str = "torch") -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(EMULATE), "--nodes", "2", "--per-node", "1", "--transport", transport,
                             "--", "sleep", "300"], stderr=subprocess.PIPE, text=True, env=environment())
    line = proc.stderr.readline()  # the first line names the run, once its nodes exist
    run_id = run_id_of(line)
    # The bridge and two nodes, and for MPI the head node mpiexec runs on.
    assert len(namespaces(run_id)) == (4 if transport == "mpi" else 3)
    return proc, run_id


@needs_netns
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport, signum", [("torch", signal.SIGINT), ("torch", signal.SIGTERM),
                                               ("mpi", signal.SIGINT)])
def test_interrupted_run_leaves_nothing(transport, signum):
    if transport == "mpi" and _mpiexec() is None:
        pytest.skip("mpiexec not found")
    proc, run_id = _start_sleeping_run(transport)
    try:
        time.sleep(1.0)  # the job is running by now
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum
    finally:
        if proc.poll() is None:
            proc.kill()
            run_emulate("--cleanup", timeout=60)
        proc.stderr.close()
    assert_nothing_left(run_id)


@needs_netns
@pytest.mark.timeout(120)
def test_cleanup_removes_crashed_runs_only():
    crashed, crashed_id = _start_sleeping_run()
    live, live_id = _start_sleeping_run()
    try:
        crashed.kill()  # SIGKILL: no chance to clean up
        crashed.wait(timeout=30)
        assert namespaces(crashed_id)
        proc = run_emulate("--cleanup", timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert_nothing_left(crashed_id)
        assert len(namespaces(live_id)) == 3, proc.stderr  # a live run is left alone
    finally:
        live.send_signal(signal.SIGTERM)
        live.wait(timeout=60)
        for p in (crashed, live):
            p.stderr.close()
    assert_nothing_left(live_id)


@needs_netns
@pytest.mark.timeout(180)
def test_rate_limits_the_link(tmp_path):
    nbytes = 16 * MIB
    proc = run_emulate("--nodes", "2", "--per-node", "2", "--transport", "torch", "--rate", "100mbit", "--",
                       sys.executable, str(PROGRAM), "--out", str(tmp_path), "--big-bytes", str(nbytes))
    reps = reports(tmp_path, proc, 4)
    assert all(rep["gloo_big"]["ok"] for rep in reps)
    busiest = max(reps, key=lambda rep: rep["gloo_big"]["tx_bytes"])
    sent = busiest["gloo_big"]["tx_bytes"]
    assert sent >= nbytes, [rep["gloo_big"] for rep in reps]
    # A lower bound only (noise can only make it slower): what left the node cannot
    # have left faster than 100 Mbit/s, less the tbf bucket's 256 KiB head start.
    floor = (sent - 256 * 1024) * 8 / 100e6
    assert busiest["gloo_big"]["seconds"] >= 0.9 * floor, (busiest["gloo_big"], floor)
    assert_nothing_left(run_id_of(proc.stderr))


def _load_emulate():
    spec = importlib.util.spec_from_file_location("emulate", EMULATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(60)
def test_refuses_to_run_without_root(monkeypatch, capsys):
    # In process with geteuid faked: a real unprivileged user may not be able to reach
    # this Python (a venv under /root, say).
    emulate = _load_emulate()
    monkeypatch.setattr(emulate.os, "geteuid", lambda: 1000)
    assert emulate.main(["--nodes", "2", "--per-node", "1", "--", "true"]) != 0
    assert "root" in capsys.readouterr().err
    assert emulate.main(["--cleanup"]) != 0


@needs_netns
@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["mpi", "torch"])
def test_hierarchical_on_emulated_nodes_matches_formula(transport, tmp_path):
    """2 nodes x 2 ranks found by hostname: hierarchical all-reduce is right and sends
    S·2(N-1)/N off each node, the flat ring 1.5·S (bytes counted by the executor)."""
    program = ROOT / "tests" / "multirank" / "rank_traffic.py"
    count = 1 << 18
    proc = run_emulate("--nodes", "2", "--per-node", "2", "--transport", transport, "--",
                       sys.executable, str(program), "--out", str(tmp_path), "--transport", transport,
                       "--count", str(count))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert reports[0]["node_of"] == [0, 0, 1, 1]  # hostnames, not FMCOMM_NODE_ID, told the nodes apart
    size = count * 4
    for node in (0, 1):
        ranks = [r for r in range(4) if reports[0]["node_of"][r] == node]
        assert all(reports[r]["hierarchical"]["ok"] and reports[r]["ring"]["ok"] for r in ranks)
        assert sum(reports[r]["hierarchical"]["inter_node_bytes"] for r in ranks) == size
        assert sum(reports[r]["ring"]["inter_node_bytes"] for r in ranks) == size * 3 // 2


@needs_netns
@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["mpi", "torch"])
def test_compressed_on_emulated_nodes(transport, tmp_path):
    """Every compressor, flat and @inter, across 2 emulated nodes x 2 ranks found by
    hostname: the checks of tests/multirank/test_compressed.py (correct, identical
    bytes on every rank) and fp8@inter's bytes off each node against its formula."""
    sys.path.insert(0, str(ROOT / "tests" / "multirank"))
    from test_compressed import check_reports, check_traffic
    program = ROOT / "tests" / "multirank" / "rank_compressed.py"
    proc = run_emulate("--nodes", "2", "--per-node", "2", "--transport", transport, "--",
                       sys.executable, str(program), "--out", str(tmp_path), "--transport", transport,
                       "--nodes", "0", timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reps = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert reps[0]["node_of"] == [0, 0, 1, 1] and reps[0]["levels"]
    check_reports(reps)
    check_traffic(reps)


@needs_netns
@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["mpi", "torch"])
def test_moe_on_emulated_nodes(transport, tmp_path):
    """MoE dispatch/combine, both routes, across 2 emulated nodes x 2 ranks found by
    hostname (checked: two nodes, the hierarchical route taken): the checks of
    tests/multirank/rank_moe.py (round trips bit for bit, fp8 within its bound, async,
    validation on every rank)."""
    sys.path.insert(0, str(ROOT / "tests" / "multirank"))
    from test_moe import check_job
    program = ROOT / "tests" / "multirank" / "rank_moe.py"
    proc = run_emulate("--nodes", "2", "--per-node", "2", "--transport", transport, "--",
                       sys.executable, str(program), "--out", str(tmp_path), "--transport", transport,
                       "--nodes", "0", "--expect-nodes", "2", "--algos", "direct,hierarchical", timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_job([json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)], "direct,hierarchical",
              layer=False, world=4, extra=1)
