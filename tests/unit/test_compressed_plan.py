"""The compressed all-reduce's plan of phases: one level or two, the groups, the pieces.
The executor follows it (tests/multirank/test_compressed.py checks the phases it timed
against it) and the cost model prices it (test_cost_plans.py)."""
import pytest

from fmcomm.algorithms import compressed_plan
from fmcomm.algorithms.compressed_plan import plan


@pytest.mark.parametrize("node_of,inter,two_level", [
    ((0, 0, 1, 1), True, True),
    ((0, 1), True, True),                 # one rank per node: the node steps are trivial, the lanes are not
    ((0, 0, 0, 1, 1, 1), True, True),
    ((0, 0, 1), True, False),             # unequal nodes: one level over the group
    ((0, 0, 0, 0), True, False),          # one node
    ((0, 0, 1, 1), False, False),         # no @inter
])
def test_levels(node_of, inter, two_level):
    p = plan(node_of, inter, 1000)
    assert p.two_level == two_level
    if two_level:
        assert p.phase_names == ("intra_reduce_scatter", "encode", "exchange", "reduce_and_encode", "gather",
                                 "intra_all_gather", "decode")
        assert (p.nodes * p.ranks_per_node, p.lane_width) == (len(node_of), p.nodes)
        assert [x.group for x in p.phases if x.name in ("exchange", "gather")] == ["lane", "lane"]
    else:
        assert p.phase_names == ("encode", "exchange", "reduce_and_encode", "gather", "decode")
        assert p.lane_width == len(node_of) and p.pieces == ((0, 1000, 1000),)


def test_pieces_cover_the_tensor(monkeypatch):
    monkeypatch.setattr(compressed_plan, "PIECE_ELEMENTS", 100)
    p = plan((0, 0, 0, 1, 1, 1), True, 1001)   # 3 local ranks: pieces of 300 values, shards of 100
    assert p.pieces == ((0, 300, 100), (300, 300, 100), (600, 300, 100), (900, 101, 34))
    assert plan((0, 0, 1, 1), True, 0).pieces == () and plan((0, 0), False, 0).pieces == ()
