"""docs/cli.md is what the parser prints: a new or changed option fails this until it is regenerated."""
from __future__ import annotations

from pathlib import Path

from cifarlab.cli_docs import render, subcommands
from cifarlab.cli import build_parser

PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_the_command_reference_is_current() -> None:
    assert PAGE.read_text() == render(), "docs/cli.md is stale: run `make docs-cli`"


def test_the_reference_has_every_command_and_option() -> None:
    page = render()
    for name, command in subcommands(build_parser()).items():
        assert f"## cifarlab {name}\n" in page
        for action in command._actions:
            for flag in action.option_strings:
                assert flag in page, (name, flag)
