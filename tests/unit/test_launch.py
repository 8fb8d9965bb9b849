"""fmcomm.launch.detect: rank, world and local placement from each launcher's environment."""
import pytest

import fmcomm
from fmcomm.launch import LaunchInfo, detect

OPENMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
MPICH = {"PMI_RANK": "5", "PMI_SIZE": "6", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}
PMIX = {"PMIX_RANK": "2", "PMIX_SIZE": "4", "PMIX_LOCAL_RANK": "0", "PMIX_LOCAL_SIZE": "1"}
TORCHRUN = {"RANK": "6", "WORLD_SIZE": "16", "LOCAL_RANK": "6", "LOCAL_WORLD_SIZE": "8"}
SLURM = {"SLURM_PROCID": "4", "SLURM_NTASKS": "6", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2(x3)"}


@pytest.mark.parametrize("environ, expected", [
    (OPENMPI, LaunchInfo(3, 8, 1, 2, "openmpi")),
    (MPICH, LaunchInfo(5, 6, 2, 3, "mpich")),
    (PMIX, LaunchInfo(2, 4, 0, 1, "pmix")),
    (TORCHRUN, LaunchInfo(6, 16, 6, 8, "torchrun")),
    (SLURM, LaunchInfo(4, 6, 0, 2, "slurm")),
], ids=["openmpi", "mpich", "pmix", "torchrun", "slurm"])
def test_each_launcher(environ, expected):
    assert detect(environ) == expected


@pytest.mark.parametrize("environ, under_mpi", [
    (OPENMPI, True), (MPICH, True), (PMIX, True), (SLURM, True), (TORCHRUN, False), ({}, False)])
def test_under_mpi(environ, under_mpi):
    assert detect(environ).under_mpi is under_mpi


def test_no_launcher_is_rank_0_of_1():
    assert detect({"PATH": "/usr/bin", "HOME": "/root"}) == LaunchInfo(0, 1, 0, 1, "none")


def test_empty_values_count_as_unset():
    assert detect({"RANK": "", "WORLD_SIZE": ""}).launcher == "none"


def test_reads_os_environ_by_default(monkeypatch):
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    info = detect()
    assert (info.launcher, info.rank, info.world) == ("mpich", 1, 2)


def test_pmix_world_falls_back_to_open_mpi_size():
    info = detect({"PMIX_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"})
    assert (info.launcher, info.rank, info.world) == ("pmix", 1, 4)


def test_local_rank_defaults_to_rank_and_local_world_to_unknown():
    info = detect({"PMI_RANK": "2", "PMI_SIZE": "4"})
    assert (info.local_rank, info.local_world) == (2, None)


@pytest.mark.parametrize("per_node, expected", [("4", 4), ("2(x3)", 2), ("8(x1)", 8)])
def test_slurm_tasks_per_node_forms(per_node, expected):
    env = {**SLURM, "SLURM_NTASKS_PER_NODE": per_node}
    assert detect(env).local_world == expected


def test_torchrun_wins_over_mpi_variables():
    assert detect({**OPENMPI, **TORCHRUN}).launcher == "torchrun"


def test_open_mpi_wins_over_its_own_pmix_variables():
    # Open MPI's mpirun sets both families; the OMPI ones are the primary source.
    assert detect({**PMIX, **OPENMPI}) == LaunchInfo(3, 8, 1, 2, "openmpi")


def test_mpich_wins_over_slurm():
    # mpiexec inside an salloc: the SLURM_* variables describe the allocation, not the job.
    assert detect({**SLURM, **MPICH}).launcher == "mpich"


@pytest.mark.parametrize("environ", [
    {"RANK": "4", "WORLD_SIZE": "4"},
    {"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "2"},
    {"PMI_RANK": "-1", "PMI_SIZE": "2"},
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "0"},
], ids=["rank==world", "rank>world", "negative", "world0"])
def test_rank_outside_world_is_an_init_error(environ):
    with pytest.raises(fmcomm.InitError, match="outside world size"):
        detect(environ)


@pytest.mark.parametrize("environ, name", [
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2.0"}, "WORLD_SIZE"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "x"}, "MPI_LOCALRANKID"),
    ({**SLURM, "SLURM_NTASKS_PER_NODE": "(x3)"}, "SLURM_NTASKS_PER_NODE"),
])
def test_non_integer_value_is_an_init_error_naming_the_variable(environ, name):
    with pytest.raises(fmcomm.InitError, match=name + "="):
        detect(environ)


@pytest.mark.parametrize("environ, missing", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE"),
    ({"PMI_RANK": "0"}, "PMI_SIZE"),
    ({"PMIX_RANK": "0"}, "PMIX_SIZE"),
    ({"SLURM_PROCID": "0"}, "SLURM_NTASKS"),
])
def test_rank_without_world_is_an_init_error(environ, missing):
    with pytest.raises(fmcomm.InitError, match=f"is set but {missing} is not"):
        detect(environ)


def test_init_error_is_an_fmcomm_error():
    with pytest.raises(fmcomm.FmcommError):
        detect({"RANK": "0"})


@pytest.mark.parametrize("node, expected", [("0", 3), ("1", 2), ("2", 2), ("3", 1)])
def test_slurm_uneven_nodes_read_this_nodes_count(node, expected):
    env = {**SLURM, "SLURM_NODEID": node, "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "3,2(x2),1"}
    assert detect(env).local_world == expected


@pytest.mark.parametrize("name, value", [("RANK", "1,5"), ("WORLD_SIZE", "3(x2)"), ("PMI_SIZE", "4,4")])
def test_list_shaped_values_outside_slurm_lists_are_errors(name, value):
    env = {"RANK": "1", "WORLD_SIZE": "4"} if name in ("RANK", "WORLD_SIZE") else {"PMI_RANK": "0", "PMI_SIZE": "4"}
    env[name] = value
    with pytest.raises(fmcomm.InitError, match=name):
        detect(env)
