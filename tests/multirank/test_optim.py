"""fmcomm.optim's OneBitAdam and OneBitSGD on DDP (gloo), world sizes 2, 3 and 4 (4: two
emulated nodes, where @inter compresses between them).

Cases and tolerances are in rank_optim.py: uncompressed, both equal PyTorch's AdamW
and SGD under plain DDP within float32 rounding (the warm-up bit for bit on one
node); every compressor learns within 10% of the uncompressed loss; the variance
freezes; parameters no gradient reaches are masked; a non-finite gradient skips the
step on every rank; checkpoint/resume in and after the warm-up is bit for bit; misuse
errors. Every rank must end every case with identical parameters.
"""
import pytest

from conftest import case_failures, run_ranks


@pytest.mark.timeout(300)
# 2 (one node) and 4 (two nodes, @inter) by default; 3 with -m more_worlds.
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.more_worlds), 4])
def test_compressed_momentum_optimizers(world, tmp_path):
    nodes = ("--nodes", "2") if world == 4 else ()
    reports = run_ranks(world, "rank_optim.py", *nodes, out_dir=tmp_path, timeout=280, env={"FMCOMM_TIMEOUT": "120"})
    failures = case_failures(reports)
    assert not failures, "\n".join(failures)
    assert len(reports[0]) >= 20
