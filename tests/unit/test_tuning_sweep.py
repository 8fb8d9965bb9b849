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


def test_a_choice_within_noise_of_the_one_below_keeps_it():
    noisy = SizeResult(1024, "ring", [Measured("ring", [1.0] * 5), Measured("native", [1.01] * 5)], {}, ["native"],
                       ["native"])
    rows = rows_of("all_reduce", [result(4, "native"), noisy, result(16384, "ring", "native")], "float32", (0, 0))
    assert [(r.algorithm, r.min_bytes, r.max_bytes) for r in rows] == [("native", 0, 16384), ("ring", 16384, None)]
    assert "within noise of the fastest at 1024" in rows[0].note
    # Within the spreads but beyond the floor: the faster one takes the size.
    spread = SizeResult(1024, "ring", [Measured("ring", [1.0] * 5), Measured("native", [1.2] * 5)], {}, ["native"])
    rows = rows_of("all_reduce", [result(4, "native"), spread], "float32", (0, 0))
    assert [r.algorithm for r in rows] == ["native", "ring"]


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


def test_plots_need_matplotlib_and_say_so(tmp_path, monkeypatch, capsys):
    import builtins
    from fmcomm.bench.report import line_plot
    real = builtins.__import__

    def without_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", without_matplotlib)
    assert line_plot({"a": [(1, 1.0)]}, str(tmp_path / "p.png"), "t", "y") is False
    assert "pip install matplotlib" in capsys.readouterr().err and not (tmp_path / "p.png").exists()


def test_the_tune_plot_draws_every_candidate(tmp_path):
    import pytest
    pytest.importorskip("matplotlib")
    from fmcomm.tuning.sweep import plot
    rows = rows_of("all_reduce", [result(4, "tree"), result(4096, "ring")], "float32", (0, 0))
    assert plot(tables.TuningTable(tuple(rows), "test"), str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_a_tune_keeps_what_the_machine_table_holds_for_other_layouts(tmp_path):
    from fmcomm.tuning.sweep import TuneArgs, _other_layouts
    two = rows_of("all_reduce", [result(4, "tree")], "float32", (0, 0))
    four = rows_of("all_reduce", [result(4, "ring")], "float32", (0, 0, 0, 0))
    measured = [{"spec": "none", "bytes": 65536, "median_us": 1.0, "rel_error": 0.0, "world": 2, "nodes": 1},
                {"spec": "none", "bytes": 65536, "median_us": 2.0, "rel_error": 0.0, "world": 4, "nodes": 1}]
    path = tmp_path / "t.json"
    tables.TuningTable(tuple(two + four), "earlier", "fp", None, tuple(measured)).dump(path)
    again = rows_of("all_reduce", [result(4, "native")], "float32", (0, 0, 0, 0))
    rows, compression = _other_layouts(str(path), "fp", again, TuneArgs(), 4, 1, True)
    assert rows == two and compression == measured[:1]          # world 4's are replaced
    assert _other_layouts(str(path), "another machine", again, TuneArgs(), 4, 1, True) == ([], [])
