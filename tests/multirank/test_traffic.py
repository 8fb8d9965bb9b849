"""Hierarchical all-reduce sends S·2(N-1)/N bytes off each node; a flat ring sends more.

Two nodes of two ranks, told apart by FMCOMM_NODE_ID (mpiexec's MPMD form gives each
pair its own value). Byte counts come from the executor; they are exact, so the test
compares them with the formulas exactly (up to the rounding of chunk boundaries,
which the count chosen here avoids).
"""
import os
import subprocess
import sys

import pytest

from conftest import MULTIRANK, ROOT, mpiexec

COUNT = 1 << 18  # divisible by every chunking used: exact formulas


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["mpi", "torch"])
def test_hierarchical_traffic_matches_formula(transport, tmp_path):
    prog = [sys.executable, str(MULTIRANK / "rank_traffic.py"), "--out", str(tmp_path), "--transport", transport,
            "--count", str(COUNT)]
    cmd = [mpiexec(), "-n", "2", "-env", "FMCOMM_NODE_ID", "nodeA", *prog, ":",
           "-n", "2", "-env", "FMCOMM_NODE_ID", "nodeB", *prog]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert reports[0]["node_of"] == [0, 0, 1, 1]
    S = COUNT * 4
    per_node = {}
    for r, rep in enumerate(reports):
        assert rep["hierarchical"]["ok"] and rep["ring"]["ok"]
        for algo in ("hierarchical", "ring"):
            per_node.setdefault((algo, rep["node_of"][r]), 0)
            per_node[(algo, rep["node_of"][r])] += rep[algo]["inter_node_bytes"]
    N = 2
    for node in (0, 1):
        assert per_node[("hierarchical", node)] == S * 2 * (N - 1) // N  # = S
        # In the ring, rank 1 sends everything to rank 2 and rank 3 to rank 0: each
        # node puts one rank's 2(p-1)/p·S = 1.5·S on the link.
        assert per_node[("ring", node)] == S * 3 // 2
    # Every rank still sends 2(p-1)/p·S in total with either algorithm; only where it goes differs.
    assert all(rep["ring"]["wire_bytes"] == S * 3 // 2 for rep in reports)
