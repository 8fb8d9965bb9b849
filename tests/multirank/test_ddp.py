"""fmcomm.ddp's comm hook in DDP training on gloo, world sizes 2, 3 and 4 (4: two emulated nodes).

Cases and tolerances are in rank_ddp.py: one step's gradients against the exact
average (uncompressed and every compressor), bucket views, static graphs, small
buckets, half-precision models, several steps matching plain DDP, no_sync
accumulation, convergence with error feedback, checkpoint/resume giving the same
parameters as an uninterrupted run, pickling, and misuse errors. Every rank must
end every case with identical parameters (or gradients).
"""
import pytest

from conftest import case_failures, run_ranks


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ddp_hook(world, tmp_path):
    # World 4 runs as two emulated nodes, where uncompressed buckets take fmcomm's own
    # all-reduce; 2 and 3 on one node, where they go to the process group's.
    nodes = ("--nodes", "2") if world == 4 else ()
    reports = run_ranks(world, "rank_ddp.py", *nodes, out_dir=tmp_path, timeout=280,
                        env={"FMCOMM_TIMEOUT": "120"})
    failures = case_failures(reports)
    assert not failures, "\n".join(failures)
    assert len(reports[0]) >= 20
