"""select(request, topology, table) -> Plan: a pure function, checked on the machine
presets in topology/ and on small fixture layouts.

The default table (fmcomm/tuning/default_table.json) gives: the engine's all-reduce
below 1 MiB where it has the dtype and op, ring from there up on one node (or
always, where the engine cannot reduce the dtype), hierarchical from there up where
several nodes each hold two or more ranks; one schedule per other collective."""
import json

import pytest

from fmcomm import InvalidArgument, TuningFileError, UnsupportedError
from fmcomm.topology import Topology, presets
from fmcomm.tuning import cost, table as tables
from fmcomm.tuning.select import Request, configured, select

DEFAULT = tables.default_table()
BIG, SMALL = 4 << 20, 4 << 10


def request(nbytes, native=True, algo="auto", collective="all_reduce", dtype="float32"):
    return Request(collective, nbytes, dtype, "sum", "cpu", algo, native, "fake")


@pytest.mark.parametrize("node_of,big_choice", [
    ((0,), "ring"),
    ((0, 0, 0, 0), "ring"),         # one node
    ((0, 1, 2, 3), "ring"),         # one rank per node: nothing to reduce inside a node
    ((0, 0, 1), "ring"),            # a node of one rank
    ((0, 0, 1, 1), "hierarchical"),
    ((0, 0, 0, 1, 1, 1), "hierarchical"),
])
def test_default_table_by_size_and_layout(node_of, big_choice):
    topo = Topology(node_of)
    assert select(request(SMALL), topo, DEFAULT).algorithm == "native"
    assert select(request(BIG), topo, DEFAULT).algorithm == big_choice
    # Where the engine cannot reduce this dtype, small messages take the schedule too.
    assert select(request(SMALL, native=False), topo, DEFAULT).algorithm == "ring"


@pytest.mark.parametrize("preset,nodes,big_choice", [
    ("dgx-h100", 1, "ring"), ("dgx-h100", 16, "hierarchical"), ("dgx-a100", 2, "hierarchical"),
    ("pcie-8gpu", 1, "ring"), ("cpu-100gbe", 1, "ring"), ("cpu-100gbe", 4, "hierarchical"),
    ("emulated-2x2-1gbit", None, "hierarchical"),
])
def test_presets_choose_by_cost_where_the_default_table_names_a_schedule(preset, nodes, big_choice):
    topo = presets.load(preset)
    if nodes:
        topo = presets.resize(topo, nodes)
    plan = select(request(BIG), topo, DEFAULT)
    prices = {a: cost.price("all_reduce", a, topo, BIG, 4, full_budget_s=0.0).seconds
              for a in cost.algorithms("all_reduce")}
    assert plan.algorithm == min(prices, key=prices.get) and plan.reason.startswith(f"cost model on {preset}")
    assert select(request(SMALL), topo, DEFAULT).algorithm == "native"  # a default row naming native stands
    # The same layout without figures: the default table alone.
    assert select(request(BIG), Topology(topo.node_of), DEFAULT).algorithm == big_choice


def test_the_plan_says_which_row_chose_it():
    plan = select(request(BIG), Topology((0, 0, 1, 1)), DEFAULT)
    assert plan.row is DEFAULT.rows[1] and plan.reason.startswith("default table row 1: all_reduce [1M, inf)")
    forced = select(request(BIG, algo="tree"), Topology((0, 0, 1, 1)), DEFAULT)
    assert forced.algorithm == "tree" and forced.row is None and "forced" in forced.reason


def test_every_collective_has_a_default():
    for coll, algo in [("reduce_scatter", "ring"), ("all_gather", "ring"), ("broadcast", "binomial"),
                       ("reduce", "binomial"), ("all_to_all", "scattered"), ("barrier", "dissemination")]:
        assert select(request(SMALL, collective=coll), Topology((0, 0)), DEFAULT).algorithm == algo


def test_a_forced_choice_that_cannot_run_is_an_error_never_replaced():
    with pytest.raises(UnsupportedError, match="no native all_reduce for float32 sum"):
        select(request(SMALL, native=False, algo="native"), Topology((0, 0)), DEFAULT)
    with pytest.raises(InvalidArgument, match="unknown algorithm 'rong' for all_reduce"):
        select(request(SMALL, algo="rong"), Topology((0, 0)), DEFAULT)


def table_file(tmp_path, rows, version=1, name="t.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"format": "fmcomm-tuning", "version": version, "rows": rows}))
    return str(path)


def test_a_measured_table_comes_first_and_the_default_covers_the_rest(tmp_path):
    path = table_file(tmp_path, [
        {"collective": "all_reduce", "min_bytes": 0, "max_bytes": 65536, "algorithm": "recursive_doubling",
         "world": [4, 4]},
        {"collective": "all_reduce", "min_bytes": 65536, "max_bytes": None, "algorithm": "native",
         "dtypes": ["float32"]},
    ])
    table = tables.active(path)
    four, two = Topology((0, 0, 0, 0)), Topology((0, 0))
    assert select(request(SMALL), four, table).algorithm == "recursive_doubling"
    assert select(request(SMALL), two, table).reason.startswith("default table row 0")  # world 2: not covered
    assert select(request(BIG), four, table).reason == f"tuning table {path} row 1: all_reduce [64K, inf) float32 -> native"
    assert select(request(BIG, dtype="bfloat16"), four, table).algorithm == "ring"  # row 1 is float32 only
    assert select(request(BIG, native=False), four, table).algorithm == "ring"  # row 1 cannot run: passed over


@pytest.mark.parametrize("rows,version,problem", [
    ([{"collective": "all_reduce", "algorithm": "rng"}], 1, r"rows\[0\].algorithm: 'rng' is not an algorithm"),
    ([{"collective": "allreduce", "algorithm": "ring"}], 1, r"rows\[0\].collective"),
    ([{"collective": "all_reduce", "algorithm": "ring", "min_bytes": 8, "max_bytes": 4}], 1, "min_bytes 8"),
    ([{"collective": "all_reduce", "algorithm": "ring", "nodes": [3, 2]}], 1, r"rows\[0\].nodes"),
    ([], 2, "format version 2 is newer"),
])
def test_unusable_tables_are_refused_naming_file_and_field(tmp_path, rows, version, problem):
    path = table_file(tmp_path, rows, version)
    with pytest.raises(TuningFileError, match=problem) as e:
        tables.load(path)
    assert path in str(e.value)


def test_an_unusable_configured_table_warns_once_and_falls_back(tmp_path, caplog):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with caplog.at_level("WARNING", logger="fmcomm"):
        assert tables.active(str(path)) is DEFAULT
        assert tables.active(str(path)) is DEFAULT
        stale = table_file(tmp_path, [], name="stale.json")
        doc = json.loads(open(stale).read())
        open(stale, "w").write(json.dumps({**doc, "fingerprint": "0123456789abcdef"}))
        assert tables.active(stale, "fedcba9876543210") is DEFAULT
        assert tables.active(stale, "0123456789abcdef") is not DEFAULT
    warnings = [r for r in caplog.records if "broken.json" in r.getMessage()]
    assert len(warnings) == 1 and "is not valid JSON" in warnings[0].getMessage()
    assert [r.getMessage() for r in caplog.records if "stale.json" in r.getMessage()] == [
        f"tuning table {stale} was measured on another machine (topology fingerprint 0123456789abcdef, this one "
        f"fedcba9876543210); auto follows the default table instead (re-run fmcomm tune here)"]


def test_the_cache_path_is_keyed_by_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tables.cache_path("abc") == tmp_path / "fmcomm" / "tuning-abc.json"
    assert tables.active("", "abc") is DEFAULT  # nothing cached yet
    (tmp_path / "fmcomm").mkdir()
    DEFAULT.dump(tables.cache_path("abc"))
    assert tables.active("", "abc").source == f"tuning table {tables.cache_path('abc')} then default table"


def test_tables_round_trip_through_json(tmp_path):
    path = tmp_path / "copy.json"
    DEFAULT.dump(path)
    again = tables.load(path)
    assert again.rows == DEFAULT.rows


def test_configured_algorithm_per_collective():
    assert configured("all_reduce", "all_reduce:ring;broadcast:chain") == "ring"
    assert configured("barrier", "ring") == "auto"


def measured_table(tmp_path, entries):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": "fmcomm-tuning", "version": 1, "rows": [], "compression": [
        {"spec": spec, "bytes": size, "median_us": us, "rel_error": err} for spec, size, us, err in entries]}))
    return tables.active(str(path))


def test_compression_by_measurement_within_the_error_budget(tmp_path):
    from fmcomm.tuning.select import choose_compression
    table = measured_table(tmp_path, [
        ("none", 1 << 20, 100.0, 0.0), ("fp8:e4m3", 1 << 20, 150.0, 0.035), ("onebit", 1 << 20, 140.0, 0.7),
        ("none", 16 << 20, 900.0, 0.0), ("fp8:e4m3", 16 << 20, 400.0, 0.035), ("onebit", 16 << 20, 100.0, 0.7)])
    topo = Topology((0, 0))
    big = choose_compression(32 << 20, 0.05, topo, table)
    assert (big.spec, big.min_bytes) == ("fp8:e4m3", 16 << 20) and "measured at 16777216 bytes" in big.reason
    assert choose_compression(32 << 20, 1.0, topo, table).spec == "onebit"
    assert choose_compression(32 << 20, 0.01, topo, table).spec == "none"      # nothing within 1%
    assert choose_compression(2 << 20, 1.0, topo, table).spec == "none"       # nearest measured size: 1 MiB


def test_compression_by_cost_where_nothing_was_measured():
    from fmcomm.tuning.select import choose_compression
    emulated = presets.load("emulated-2x2-1gbit")  # 1 Gbit between nodes, codec rates measured here
    choice = choose_compression(16 << 20, 0.05, emulated, DEFAULT)
    assert choice.spec == "fp8:e4m3@inter" and choice.reason.startswith("cost model on emulated-2x2-1gbit")
    assert choose_compression(16 << 20, 1.0, emulated, DEFAULT).spec == "onebit@inter"
    bare = choose_compression(16 << 20, 1.0, Topology(emulated.node_of), DEFAULT)
    assert bare.spec == "none" and "no measurement" in bare.reason
