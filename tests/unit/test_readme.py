"""The README is the contract for the two commands; docs/configuration.md for the option
table; every page the README links to exists."""
import re
from pathlib import Path

from fmcomm.config import OPTIONS, markdown_table

ROOT = Path(__file__).resolve().parents[2]


def first_code_block(text: str) -> list[str]:
    blocks = text.split("```")
    return [line for line in blocks[1].splitlines()[1:] if line.strip()]


def test_first_code_block_holds_exactly_the_two_commands():
    cmds = first_code_block((ROOT / "README.md").read_text())
    assert len(cmds) == 2, cmds
    assert "fmcomm bench all_reduce -n 4" in cmds[0] and "--peer mpi,torch" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    # .ci/run extracts line two of that block; make sure it would find this one.
    run = (ROOT / ".ci" / "run").read_text()
    assert "sed -n 2p" in run and "README.md" in run


def test_option_table_is_current():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert markdown_table() in page, "regenerate the table with: python -m fmcomm.config"
    for opt in OPTIONS:
        assert opt.env in page


def test_every_linked_page_exists():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links, "the README links to its docs/ pages"
    assert [p for p in links if not (ROOT / p).exists()] == []
