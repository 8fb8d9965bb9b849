"""The ``auto`` rule of fmcomm/select.py: native below the ring threshold, ring above it
on one node, hierarchical above it where several nodes each hold two or more ranks."""
import pytest

from fmcomm.config import Config
from fmcomm.dtypes import DTYPES
from fmcomm.select import select


class EngineWithAllReduce:
    """Only what select() asks a transport: which native collectives it has."""
    name = "fake"

    def __init__(self, native: bool = True):
        self.native = native

    def supports_native(self, collective, dtype, op, device):
        return self.native and collective == "all_reduce"


BIG, SMALL = 4 << 20, 4 << 10


@pytest.mark.parametrize("node_of,big_choice", [
    (None, "ring"),                 # topology unknown
    ((0, 0, 0, 0), "ring"),         # one node
    ((0, 1, 2, 3), "ring"),         # one rank per node: nothing to reduce inside a node
    ((0, 0, 1), "ring"),            # a node of one rank
    ((0, 0, 1, 1), "hierarchical"),
    ((0, 0, 0, 1, 1, 1), "hierarchical"),
])
def test_auto_all_reduce_by_size_and_topology(node_of, big_choice):
    f32, cfg = DTYPES["float32"], Config()
    assert select("all_reduce", SMALL, f32, "sum", "cpu", EngineWithAllReduce(), cfg, None, node_of) == "native"
    assert select("all_reduce", BIG, f32, "sum", "cpu", EngineWithAllReduce(), cfg, None, node_of) == big_choice
    # Where the engine cannot reduce this dtype, small messages take the schedule too.
    small_without_native = select("all_reduce", SMALL, f32, "sum", "cpu", EngineWithAllReduce(False), cfg, None,
                                  node_of)
    assert small_without_native == "ring"


def test_explicit_algorithm_and_zero_threshold_win_over_topology():
    f32, nodes = DTYPES["float32"], (0, 0, 1, 1)
    assert select("all_reduce", BIG, f32, "sum", "cpu", EngineWithAllReduce(), Config(), "ring", nodes) == "ring"
    never = Config.from_env({}, auto_ring_min_bytes="0")
    assert select("all_reduce", BIG, f32, "sum", "cpu", EngineWithAllReduce(), never, None, nodes) == "native"
