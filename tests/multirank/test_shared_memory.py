"""The /dev/shm path of @inter compressed all-reduces, on real processes.

rank_shared_memory.py holds the cases and their checks: the segment's reduce-scatter
(bit for bit the float32 sum in local-rank order) and all-gather on groups of every
size up to the world, growth, attach failures on one rank, mismatched calls; and, at
two nodes of 2, fp8@inter / onebit@inter giving the same bytes with FMCOMM_SHM=auto
and off. World 4 runs over both transports; world 5 (groups up to 5, nodes of 3 and
2) over MPI only: each launch costs seconds of start-up on a small machine.
Here: every case passed, every rank of a group ended with identical bytes, and no
segment file is left in /dev/shm.
"""
import os
from collections import defaultdict

import pytest

from conftest import run_ranks


def check_reports(reports):
    """Every case passed on every rank that ran it, and hashed results agree among those ranks."""
    by_case = defaultdict(list)
    for rank, report in enumerate(reports):
        for key, entry in report.items():
            if key != "pid":
                by_case[key].append((rank, entry))
    failures = []
    for key, entries in sorted(by_case.items()):
        for rank, e in entries:
            if not e.get("ok"):
                failures.append(f"{key} rank {rank}: {e.get('error') or e}")
        hashes = {e["hash"] for _, e in entries if "hash" in e}
        if len(hashes) > 1:
            failures.append(f"{key}: ranks {[r for r, _ in entries]} ended with different bytes")
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} failures)"
    return set(by_case)


def check_no_files_left(reports):
    pids = {r["pid"] for r in reports}
    left = [f for f in os.listdir("/dev/shm") if f.startswith("fmcomm-") and int(f.split("-")[1]) in pids]
    assert not left, left


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world,transport", [(4, "mpi"), (4, "torch"), (5, "mpi")])
def test_shared_memory(world, transport, tmp_path):
    reports = run_ranks(world, "rank_shared_memory.py", "--transport", transport, out_dir=tmp_path,
                        timeout=100, env={"FMCOMM_TIMEOUT": "60"})
    keys = check_reports(reports)
    group_sizes = {int(key.split("/")[1]) for key in keys if key.startswith(("nodes/", "all_but_last/", "all/"))}
    assert group_sizes == set(range(1, world + 1)), group_sizes
    assert {"refused/rank0", "refused/rank2", "refused/memo", "mismatch"} <= keys
    if world == 4:  # two nodes of 2: the @inter split exists
        assert {"fp8@inter/1000003", "onebit@inter/1000003", "attached", "fallback", "async"} <= keys
    check_no_files_left(reports)
