"""A rank with another size or dtype, or a rank that never calls: typed errors, no hang.

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
    errors = [r["error"] for r in reports]
    assert all(e in ("MismatchError", "CommTimeoutError") for e in errors), reports
    assert "MismatchError" in errors, reports  # at least one rank names the disagreement
    mismatch = next(r for r in reports if r["error"] == "MismatchError")
    assert (("float64" in mismatch["message"]) if scenario == "dtype" else ("count" in mismatch["message"]))
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
        assert "all_reduce" in r["message"] and "seq 1" in r["message"], r
    if algo == "ring":
        # Rank 2 receives from rank 1 first, so its error names rank 1.
        assert reports[2]["peer"] == 1, reports[2]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["mpi", "torch"])
@pytest.mark.parametrize("scenario,algo", [("root", "binomial"), ("root", "chain"), ("splits", "pairwise")])
def test_disagreeing_root_or_splits(scenario, algo, transport, tmp_path):
    reports = run_ranks(3, "rank_failures.py", "--transport", transport, "--scenario", scenario, "--algo", algo,
                        out_dir=tmp_path, env={"FMCOMM_TIMEOUT": TIMEOUT_S}, timeout=100)
    # Every rank gets a typed error (the disagreement named where a peer can see it,
    # a timeout naming the operation elsewhere); none hangs, none returns a result.
    assert all(r["error"] in ("MismatchError", "CommTimeoutError") for r in reports), reports
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
