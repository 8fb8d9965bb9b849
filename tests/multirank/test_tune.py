"""fmcomm tune on 3 ranks (a world size that is not a power of two): it writes a table
to the per-user cache for this machine's topology fingerprint, every row's choice is
the fastest candidate it measured there, it measured fewer calls than a full sweep,
and a later job's init() finds the table and auto runs what it chose
(rank_tune.py)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, case_failures, run_ranks
from fmcomm.tuning import table as tables


@pytest.mark.timeout(300)
def test_tune_writes_a_table_that_auto_follows(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "fmcomm.cli", "tune", "-n", "3", "-b", "4", "-e", "256K", "-f", "64",
                           "--collectives", "all_reduce,broadcast"], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = list((tmp_path / "fmcomm").glob("tuning-*.json"))
    assert len(written) == 1, proc.stdout
    table = tables.load(written[0])
    assert written[0].name == f"tuning-{table.fingerprint}.json"
    assert table.meta["world"] == 3 and 0 < table.meta["measurements"] < table.meta["full_sweep_measurements"]
    for coll in ("all_reduce", "broadcast"):
        rows = [r for r in table.rows if r.collective == coll]
        assert rows[0].min_bytes == 0 and rows[-1].max_bytes is None
        assert all(a.max_bytes == b.min_bytes for a, b in zip(rows, rows[1:]))  # no gaps, no overlaps
        for row in rows:
            for m in row.measured:
                fastest = min(m["candidates"], key=lambda a: m["candidates"][a]["median_us"])
                assert m["choice"] == fastest
                assert row.algorithm == fastest or row.algorithm in m.get("within_noise_floor", [])
    assert "timed calls against" in proc.stdout and "written:" in proc.stdout

    reports = run_ranks(3, "rank_tune.py", "--table", str(written[0]), out_dir=tmp_path,
                        env={"XDG_CACHE_HOME": str(tmp_path)}, timeout=120)
    failures = case_failures(reports)
    assert not failures, "\n".join(failures)
