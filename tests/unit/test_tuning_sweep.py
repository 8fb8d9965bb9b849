"""fmcomm tune's pure parts: how samples decide "within noise", and how measured sizes
become table rows (adjacent sizes with one winner merge; the first row starts at 0, the
last is unbounded; rows are for the measured layout and dtype only)."""
from fmcomm.topology import Topology
from fmcomm.tuning import table as tables
from fmcomm.tuning.select import Request, select
from fmcomm.tuning.sweep import Measured, SizeResult, close, describe, rows_of


def result(nbytes, winner, loser="ring"):
    return SizeResult(nbytes, winner, [Measured(winner, [1.0] * 5), Measured(loser, [2.0] * 5)], {}, [])


def test_close_uses_the_spread_and_the_noise_floor():
    steady, slower = Measured("a", [1.0, 1.0, 1.0, 1.0, 1.0]), Measured("b", [1.2, 1.2, 1.2, 1.2, 1.2])
    assert not close(steady, slower, noise=0.03)
    assert close(steady, Measured("c", [1.02] * 5), noise=0.03)           # within the floor
    noisy = Measured("d", [0.6, 0.9, 1.2, 1.5, 1.8])                      # half-IQR of 0.6 around 1.2
    assert close(steady, noisy, noise=0.03)


def test_rows_merge_adjacent_winners_and_cover_every_size():
    results = [result(4, "native"), result(64, "native"), result(1024, "recursive_doubling"),
               result(16384, "ring"), result(262144, "ring")]
    rows = rows_of("all_reduce", results, "float32", (0, 0, 1, 1))
    assert [(r.algorithm, r.min_bytes, r.max_bytes) for r in rows] == [
        ("native", 0, 1024), ("recursive_doubling", 1024, 16384), ("ring", 16384, None)]
    assert all(r.world == (4, 4) and r.nodes == (2, 2) and r.ranks_per_node == (2, 2) and r.dtypes == ("float32",)
               for r in rows)
    assert [m["bytes"] for m in rows[0].measured] == [4, 64]


def test_a_written_table_is_followed_for_its_layout_only(tmp_path):
    rows = rows_of("all_reduce", [result(4, "tree"), result(4096, "ring")], "float32", (0, 0, 0))
    path = tmp_path / "t.json"
    tables.TuningTable(tuple(rows), "test", "fp").dump(path)
    table = tables.active(str(path), "fp")
    three, four = Topology((0, 0, 0)), Topology((0, 0, 0, 0))
    ask = lambda n: Request("all_reduce", n, "float32", native=True)  # noqa: E731
    assert select(ask(100), three, table).algorithm == "tree"
    assert select(ask(1 << 30), three, table).algorithm == "ring"
    assert select(ask(100), four, table).algorithm == "native"  # another world size: the default table
    text = describe(table)
    assert "tree" in text and "ring (2.00)" in text
