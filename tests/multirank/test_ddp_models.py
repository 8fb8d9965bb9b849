"""fmcomm.ddp's hook on a transformers GPT-2 and on an MLP with an unused parameter,
under every DDP option (rank_ddp_models.py has the cases and their tolerances).

The default run takes one compressor per option; ``-m ddp_matrix`` runs every
compressor with every option. Every rank must pass every case, end with the same
parameters, and exit 0.
"""
import pytest

from conftest import case_failures, run_ranks

pytest.importorskip("transformers")


def check(reports):
    failures = case_failures(reports)
    assert not failures, "\n".join(failures)
    return set(reports[0])


# World 3 runs every case of world 2 and DDP on a sub-group besides; world 2 runs with -m more_worlds.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [pytest.param(2, marks=pytest.mark.more_worlds), 3])
def test_hook_on_real_models(world, tmp_path):
    reports = run_ranks(world, "rank_ddp_models.py", out_dir=tmp_path, timeout=580, clean_exit=True,
                        env={"FMCOMM_TIMEOUT": "120"})
    keys = check(reports)
    assert any(k.startswith("gpt2/") for k in keys) and any(k.startswith("mlp/") for k in keys)


@pytest.mark.ddp_matrix
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("world", [2, 4])
def test_hook_matrix_every_compressor(world, tmp_path):
    reports = run_ranks(world, "rank_ddp_models.py", "--matrix", "full", out_dir=tmp_path, timeout=3500,
                        clean_exit=True, env={"FMCOMM_TIMEOUT": "120"})
    check(reports)
