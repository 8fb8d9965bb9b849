import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MULTIRANK = Path(__file__).resolve().parent / "multirank"


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    import shutil
    found = shutil.which("mpiexec")
    if not found:
        pytest.skip("mpiexec not found (pip install mpich)")
    return found


def case_failures(reports: list[dict]) -> list[str]:
    """Every rank ran the same cases; what failed: a case not ``ok`` on a rank, or one
    whose ranks report different ``hash``es (different bytes)."""
    keys = set(reports[0])
    assert all(set(r) == keys for r in reports), "ranks ran different cases"
    failures = []
    for key in sorted(keys):
        entries = [r[key] for r in reports]
        for rank, e in enumerate(entries):
            if not e.get("ok"):
                failures.append(f"{key} rank {rank}: {e.get('error') or e}")
        if "hash" in entries[0] and len({e.get("hash") for e in entries}) != 1:
            failures.append(f"{key}: ranks ended with different parameters")
    return failures


def run_ranks(n: int, script: str, *args: str, env: dict | None = None, timeout: float = 300,
              out_dir: Path, clean_exit: bool = False, launcher_args: tuple = ()) -> list[dict]:
    """Run tests/multirank/<script> on ``n`` ranks under mpiexec; return each rank's JSON report.

    ``clean_exit``: the program leaves as a user's does (no ``os._exit``), and every
    rank must exit 0 without a C++ ``terminate`` on the way out. ``launcher_args``: flags
    for mpiexec itself."""
    full_env = dict(os.environ)
    full_env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    full_env.update(env or {})
    cmd = [mpiexec(), *launcher_args, "-n", str(n), sys.executable, str(MULTIRANK / script), "--out", str(out_dir), *args]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    reports = []
    for r in range(n):
        f = out_dir / f"rank{r}.json"
        if not f.exists():
            raise AssertionError(f"rank {r} wrote no report (exit {proc.returncode})\n"
                                 f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
        reports.append(json.loads(f.read_text()))
    if clean_exit:
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, (
            f"mpiexec exit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}")
    elif proc.returncode != 0:
        # A rank killed after every rank passed the closing barrier (its mark written)
        # ran nothing of the test any more: Hydra SIGKILLs the rest (exit 9) once the
        # first rank leaves without MPI_Finalize (see report_and_exit). Anything
        # earlier still fails.
        unfinished = [r for r in range(n) if not (out_dir / f"rank{r}.finished").exists()]
        assert not unfinished, (f"mpiexec exit {proc.returncode}; ranks {unfinished} did not finish\n"
                                f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return reports
