"""reduce_scatter, all_gather, broadcast, reduce, all_to_all_single and barrier on real
processes, every registered algorithm, both transports, world sizes 1, 2, 3, 4, 5, 8.
Tolerances: rank_collectives.py."""
import pytest

from conftest import run_ranks


@pytest.mark.timeout(600)
@pytest.mark.parametrize("transport", ["mpi", "torch"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
def test_collectives(world, transport, tmp_path):
    reports = run_ranks(world, "rank_collectives.py", "--transport", transport, out_dir=tmp_path, timeout=550,
                        env={"FMCOMM_TIMEOUT": "120"})
    keys = set(reports[0])
    assert all(set(r) == keys for r in reports)
    failures = []
    for key in sorted(keys):
        entries = [r[key] for r in reports]
        failures += [f"{key} rank {i}: {e.get('error', 'wrong result')}" for i, e in enumerate(entries)
                     if not e["ok"]]
        hashes = {e.get("hash") for e in entries}
        if None not in hashes and len(hashes) != 1:
            failures.append(f"{key}: ranks ended with different bytes")
    assert not failures, "\n".join(failures[:15]) + f"\n({len(failures)} failures)"
