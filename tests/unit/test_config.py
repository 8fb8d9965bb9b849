"""fmcomm.config: defaults, FMCOMM_* parsing, strictness about unknown names and bad values."""
import dataclasses

import pytest

import fmcomm
from fmcomm import config
from fmcomm.config import OPTIONS, Config, parse_size

EXPECTED_DEFAULTS = {
    "algo": "auto",
    "transport": "auto",
    "timeout": 300.0,
    "log_level": "warning",
    "segment_bytes": 1 << 20,
    "native": "auto",
    "check": True,
    "node_id": "",
    "nan": "propagate",
    "shm": "auto",
    "topo_file": "",
    "tuning_file": "",
}


def test_defaults_from_an_empty_environment():
    assert dataclasses.asdict(Config.from_env({})) == EXPECTED_DEFAULTS


def test_plain_constructor_has_the_same_defaults_as_from_env():
    assert Config() == Config.from_env({})


def test_every_option_has_a_config_field_and_the_same_default():
    assert [o.name for o in OPTIONS] == [f.name for f in dataclasses.fields(Config)]
    assert {o.name: o.default for o in OPTIONS} == EXPECTED_DEFAULTS


def test_variables_without_the_prefix_are_ignored():
    cfg = Config.from_env({"PATH": "/bin", "ALGO": "ring", "fmcomm_algo": "ring", "XFMCOMM_ALGO": "ring"})
    assert cfg == Config()


@pytest.mark.parametrize("raw, expected", [("ring", "ring"), ("RING", "ring"), (" native ", "native"),
                                           ("auto", "auto")])
def test_algo_from_env(raw, expected):
    assert Config.from_env({"FMCOMM_ALGO": raw}).algo == expected


@pytest.mark.parametrize("raw, expected", [("10", 10.0), ("0.25", 0.25), ("1e3", 1000.0)])
def test_timeout_from_env(raw, expected):
    assert Config.from_env({"FMCOMM_TIMEOUT": raw}).timeout == expected


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_log_level_from_env(level):
    assert Config.from_env({"FMCOMM_LOG_LEVEL": level.upper()}).log_level == level


@pytest.mark.parametrize("raw, expected", [("4096", 4096), ("4K", 4096), ("4k", 4096), ("64M", 64 << 20),
                                           ("2m", 2 << 20), ("1G", 1 << 30), ("8KiB", 8 << 10), ("3MB", 3 << 20)])
def test_segment_bytes_from_env(raw, expected):
    assert Config.from_env({"FMCOMM_SEGMENT_BYTES": raw}).segment_bytes == expected


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("YES", True), ("on", True),
                                           ("0", False), ("false", False), ("No", False), ("off", False)])
def test_check_from_env(raw, expected):
    assert Config.from_env({"FMCOMM_CHECK": raw}).check is expected


@pytest.mark.parametrize("raw", ["mpi", "torch", "auto"])
def test_transport_from_env(raw):
    assert Config.from_env({"FMCOMM_TRANSPORT": raw}).transport == raw


def test_several_variables_at_once():
    cfg = Config.from_env({"FMCOMM_ALGO": "ring", "FMCOMM_TIMEOUT": "5", "FMCOMM_NATIVE": "off",
                           "FMCOMM_TUNING_FILE": "/tmp/t.json", "HOME": "/root"})
    assert (cfg.algo, cfg.timeout, cfg.native, cfg.tuning_file) == ("ring", 5.0, "off", "/tmp/t.json")
    assert cfg.segment_bytes == Config().segment_bytes


@pytest.mark.parametrize("name", ["FMCOMM_ALOG", "FMCOMM_", "FMCOMM_TIMEOUT_S", "FMCOMM_EXPECT_NATIVE"])
def test_unknown_fmcomm_variable_is_an_error_naming_it(name):
    with pytest.raises(fmcomm.ConfigError, match=name + r"\b"):
        Config.from_env({name: "1"})


def test_config_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        Config.from_env({"FMCOMM_TIMEOUT": "abc"})


@pytest.mark.parametrize("name, raw", [
    ("FMCOMM_TIMEOUT", "abc"),
    ("FMCOMM_TIMEOUT", "-1"),
    ("FMCOMM_TIMEOUT", "0"),
    ("FMCOMM_TIMEOUT", "nan"),
    ("FMCOMM_TIMEOUT", ""),
    ("FMCOMM_CHECK", "maybe"),
    ("FMCOMM_TRANSPORT", "carrier-pigeon"),
    ("FMCOMM_LOG_LEVEL", "verbose"),
    ("FMCOMM_NATIVE", "sometimes"),
    ("FMCOMM_ALGO", "ring-2"),
    ("FMCOMM_ALGO", "2ring"),
    ("FMCOMM_SEGMENT_BYTES", "0"),
    ("FMCOMM_SEGMENT_BYTES", "1.5M"),
    ("FMCOMM_SEGMENT_BYTES", "-4K"),
    ("FMCOMM_SEGMENT_BYTES", "lots"),
])
def test_bad_value_is_an_error_naming_the_variable(name, raw):
    with pytest.raises(fmcomm.ConfigError, match=name + "="):
        Config.from_env({name: raw})


def test_keyword_overrides_win_over_the_environment():
    env = {"FMCOMM_ALGO": "native", "FMCOMM_TIMEOUT": "5", "FMCOMM_SEGMENT_BYTES": "4K"}
    cfg = Config.from_env(env, algo="ring", timeout=7, segment_bytes="64K")
    assert (cfg.algo, cfg.timeout, cfg.segment_bytes) == ("ring", 7.0, 64 << 10)


def test_none_override_keeps_the_environment_value():
    assert Config.from_env({"FMCOMM_TRANSPORT": "mpi"}, transport=None).transport == "mpi"


def test_unknown_keyword_override_is_an_error_naming_it():
    with pytest.raises(fmcomm.ConfigError, match="segment_size"):
        Config.from_env({}, segment_size=4096)


def test_bad_keyword_override_is_an_error_naming_the_option():
    with pytest.raises(fmcomm.ConfigError, match="timeout"):
        Config.from_env({}, timeout=-3)


def test_overrides_are_checked_even_when_the_environment_is_fine():
    with pytest.raises(fmcomm.ConfigError, match="transport"):
        Config.from_env({"FMCOMM_TRANSPORT": "mpi"}, transport="carrier-pigeon")


def test_from_env_reads_os_environ_by_default(monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("FMCOMM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("FMCOMM_ALGO", "ring")
    assert Config.from_env().algo == "ring"


def test_replace_changes_one_field_and_checks_it():
    cfg = Config.from_env({"FMCOMM_TIMEOUT": "5"})
    new = cfg.replace(algo="ring")
    assert (new.algo, new.timeout) == ("ring", 5.0)
    assert cfg.algo == "auto"  # frozen original unchanged
    with pytest.raises(fmcomm.ConfigError):
        cfg.replace(check="maybe")


@pytest.mark.parametrize("text, expected", [
    ("0", 0), (0, 0), ("4096", 4096), (4096, 4096), ("4K", 4 << 10), ("64M", 64 << 20), ("1G", 1 << 30),
    ("2T", 2 << 40), (" 16 k ", 16 << 10), ("1gib", 1 << 30), ("5b", 5),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "K", "4X", "1.5M", "-1", "4 K B", "0x10", "4MM", "one", -1])
def test_parse_size_rejects(text):
    with pytest.raises(fmcomm.ConfigError):
        parse_size(text)


def test_markdown_table_lists_every_option_env_name_and_default():
    table = config.markdown_table()
    lines = table.splitlines()
    assert lines[0].startswith("| option | environment |")
    assert len(lines) == 2 + len(OPTIONS)
    for opt, line in zip(OPTIONS, lines[2:]):
        assert f"`{opt.name}`" in line and f"`{opt.env}`" in line
    assert table.count("`1M`") == 1  # the byte default (segment_bytes) shown with a suffix


@pytest.mark.parametrize("raw", ["all_reduce:ring", "all_reduce:ring;broadcast:chain", "all_reduce:tree;"])
def test_algo_per_collective(raw):
    assert Config.from_env({"FMCOMM_ALGO": raw}).algo == raw


@pytest.mark.parametrize("raw", ["all_reduce:", ":ring", "all_reduce:ring;;x", "all_reduce=ring"])
def test_algo_per_collective_bad_shapes(raw):
    with pytest.raises(fmcomm.ConfigError, match="FMCOMM_ALGO"):
        Config.from_env({"FMCOMM_ALGO": raw})


def test_configured_algorithm_per_collective():
    from fmcomm.tuning.select import configured
    assert configured("all_reduce", "all_reduce:ring;broadcast:chain") == "ring"
    assert configured("broadcast", "all_reduce:ring;broadcast:chain") == "chain"
    assert configured("all_gather", "all_reduce:ring;broadcast:chain") == "auto"
    assert configured("all_reduce", "ring") == "ring"
    assert configured("barrier", "ring") == "auto"  # a single name applies where it exists
