"""docs/cli.md, the command reference, written from the argparse parser itself so it cannot drift.

    python -m cifarlab.cli_docs > docs/cli.md     (or: make docs-cli)

tests/test_cli_docs.py fails when the file differs from what this prints, so a new option or command
shows up in the manual in the same change."""
from __future__ import annotations

import argparse
import os

from cifarlab.cli import build_parser

WIDTH = "100"  # argparse wraps to $COLUMNS: fixed, so the page is the same on every terminal


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def render() -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = build_parser()
        parts = ["# Command reference", "",
                 "Every command and option, as `cifarlab COMMAND --help` prints it. Generated from the parser "
                 "(`make docs-cli`); a test keeps it current.", "",
                 "```text", parser.format_help().rstrip(), "```", ""]
        for name, command in subcommands(parser).items():
            parts += [f"## cifarlab {name}", "", "```text", command.format_help().rstrip(), "```", ""]
        return "\n".join(parts)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


if __name__ == "__main__":
    print(render(), end="")
