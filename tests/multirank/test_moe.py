"""fmcomm.moe dispatch/combine on real processes; the checks and tolerances are in rank_moe.py.

The default run spreads world sizes, transports and routes over four jobs (about 40 s
on 2 cores): 2 ranks over MPI and 3 over torch on one node (``direct``), 4 over MPI on
two emulated nodes (``direct`` and ``hierarchical``, with the layer against the
single-process reference), 8 over torch on two nodes (``hierarchical``). ``-m
moe_matrix`` runs every world size with both transports and both routes.
"""
import itertools

import pytest

from conftest import case_failures, run_ranks

# (world, transport, emulated nodes, routes, with the layer check)
DEFAULT_JOBS = (
    (2, "mpi", 1, "direct", True),
    (3, "torch", 1, "direct", True),
    (4, "mpi", 2, "direct,hierarchical", True),
    (8, "torch", 2, "hierarchical", False),
)
MATRIX_JOBS = tuple((world, transport, 1 if world == 3 else 2, "direct,hierarchical", True)
                    for world, transport in itertools.product((2, 3, 4, 8), ("mpi", "torch")))


def run_job(world, transport, nodes, algos, layer, tmp_path):
    args = ["--transport", transport, "--nodes", str(nodes), "--algos", algos] + (["--layer"] if layer else [])
    reports = run_ranks(world, "rank_moe.py", *args, out_dir=tmp_path, timeout=280, env={"FMCOMM_TIMEOUT": "60"})
    check_job(reports, algos, layer, world)


def check_job(reports, algos, layer, world, extra=0):
    """Every case passed on every rank, and every route ran every case: 6 round trips,
    fp8, async (and the layer) per route, then the errors (tests/emulated uses this too)."""
    failures = case_failures(reports)
    assert not failures, "\n".join(failures[:10]) + f"\n({len(failures)} failures)"
    per_route = 8 + layer
    assert len(reports[0]) == per_route * len(algos.split(",")) + (4 if world > 1 else 3) + extra


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,transport,nodes,algos,layer", DEFAULT_JOBS)
def test_moe(world, transport, nodes, algos, layer, tmp_path):
    run_job(world, transport, nodes, algos, layer, tmp_path)


@pytest.mark.moe_matrix
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,transport,nodes,algos,layer", MATRIX_JOBS)
def test_moe_matrix(world, transport, nodes, algos, layer, tmp_path):
    run_job(world, transport, nodes, algos, layer, tmp_path)
