"""A rank with another size, dtype, root, algorithm or compressor, or a rank that never
calls: typed errors, no hang. Every call's arguments are agreed in one small all-reduce
before any data moves, so every rank of a disagreeing call gets MismatchError.

FMCOMM_TIMEOUT is 3 s here; each run must finish well within the test's own timeout.
Nothing asserts on how long the errors took beyond "within the run".
"""
import pytest

from conftest import run_ranks

TIMEOUT_S = "3"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["mpi", "torch"])
@pytest.mark.parametrize("algo", ["ring", "native"])
@pytest.mark.parametrize("scenario", ["size", "dtype"])
def test_disagreeing_rank_gets_typed_error(scenario, algo, transport, tmp_path):
    reports = run_ranks(3, "rank_failures.py", "--transport", transport, "--scenario", scenario, "--algo", algo,
                        out_dir=tmp_path, env={"FMCOMM_TIMEOUT": TIMEOUT_S}, timeout=100)
    assert all(r["error"] == "MismatchError" for r in reports), reports
    for r in reports:
        assert (("float64" in r["message"]) if scenario == "dtype" else ("count" in r["message"])), r
    assert all(r.get("after") == "FmcommError" for r in reports), "a failed communicator must refuse new work"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["mpi", "torch"])
@pytest.mark.parametrize("algo", ["ring", "native"])
def test_silent_rank_times_out_naming_where(algo, transport, tmp_path):
    reports = run_ranks(3, "rank_failures.py", "--transport", transport, "--scenario", "silent", "--algo", algo,
                        out_dir=tmp_path, env={"FMCOMM_TIMEOUT": TIMEOUT_S}, timeout=100)
    waiting = [r for r in reports if r["rank"] != 1]
    assert all(r["error"] == "CommTimeoutError" for r in waiting), reports
    for r in waiting:
        # The call's agreement, which every rank joins, is where the survivors wait: a
        # collective's wait cannot tell which rank is missing, so none is named (a
        # named peer could be a live one, itself waiting).
        assert "all_reduce" in r["message"] and "seq 1" in r["message"] and r["peer"] is None, r


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["mpi", "torch"])
@pytest.mark.parametrize("scenario,algo", [("root", "binomial"), ("root", "chain"), ("splits", "pairwise")])
def test_disagreeing_root_or_splits(scenario, algo, transport, tmp_path):
    reports = run_ranks(3, "rank_failures.py", "--transport", transport, "--scenario", scenario, "--algo", algo,
                        out_dir=tmp_path, env={"FMCOMM_TIMEOUT": TIMEOUT_S}, timeout=100)
    # Every rank gets MismatchError; none hangs, none returns a result.
    assert all(r["error"] == "MismatchError" for r in reports), reports
    if scenario == "splits":
        # Rank 1 sees the pairing is wrong from the exchanged split sizes, before sending.
        assert reports[1]["error"] == "MismatchError" and "rank" in reports[1]["message"], reports[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["mpi", "torch"])
def test_disagreeing_compressor_gets_typed_error(transport, tmp_path):
    # A compressed all-reduce agrees on its arguments once, up front (its inner calls
    # skip theirs), so that one agreement must catch ranks that chose other coders.
    reports = run_ranks(3, "rank_failures.py", "--transport", transport, "--scenario", "compress",
                        out_dir=tmp_path, env={"FMCOMM_TIMEOUT": TIMEOUT_S}, timeout=100)
    assert all(r["error"] == "MismatchError" for r in reports), reports
    assert all("algo" in r["message"] for r in reports), reports
    assert all(r.get("after") == "FmcommError" for r in reports), "a failed communicator must refuse new work"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["mpi", "torch"])
@pytest.mark.parametrize("scenario,algo", [("algo", "ring"), ("algo", "tree"), ("uncompressed", "ring")])
def test_disagreeing_algorithm_or_compression_is_a_mismatch(scenario, algo, transport, tmp_path):
    # Ranks on different algorithms (or one uncompressed among compressing ones) would
    # wait for messages that never come; the agreement names the difference instead.
    reports = run_ranks(3, "rank_failures.py", "--transport", transport, "--scenario", scenario, "--algo", algo,
                        out_dir=tmp_path, env={"FMCOMM_TIMEOUT": "30"}, timeout=100)
    assert all(r["error"] == "MismatchError" for r in reports), reports
    wanted = "native" if scenario == "algo" else "compressed:fp8:e4m3"
    for r in reports:
        assert "algo: this rank" in r["message"] and wanted in r["message"], r
        assert "another algorithm" not in r["message"], r


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", [1, 0])
def test_rank_lost_while_making_a_group_is_a_typed_error(victim, tmp_path):
    # Over torch.distributed, fmcomm's groups are made by their members through the
    # group's store, bounded by FMCOMM_TIMEOUT: a lost member is a CommTimeoutError,
    # a lost store host (rank 0) a TransportError or CommTimeoutError, never a hang or
    # torch's own exception types.
    # Hydra kills every rank once one leaves early; here the survivors must speak first.
    reports = run_ranks(3, "rank_failures.py", "--transport", "torch", "--scenario", "new_group",
                        "--victim", str(victim), out_dir=tmp_path, env={"FMCOMM_TIMEOUT": TIMEOUT_S}, timeout=100,
                        launcher_args=("-disable-auto-cleanup",))
    survivors = [r for r in reports if not r.get("victim")]
    assert len(survivors) == 2
    assert all(r["error"] in ("CommTimeoutError", "TransportError") for r in survivors), reports
    assert all("new_group" in r["message"] for r in survivors), reports
