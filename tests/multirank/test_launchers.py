"""fmcomm.init() under torchrun finds its place from torchrun's environment."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MULTIRANK, ROOT


@pytest.mark.timeout(120)
def test_torchrun_launch(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "3", "--master_port", str(port),
                           str(MULTIRANK / "rank_launchers.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for r, rep in enumerate(reports):
        assert rep["rank"] == rep["env_rank"] == r and rep["world"] == 3
        assert rep["transport"] == "torch"
        assert rep["sum"] == [6.0] * 10
