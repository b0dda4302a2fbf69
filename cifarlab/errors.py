"""The exceptions a user sees: the CLI prints a CifarlabError's message on one line and exits with
status 2; a RunInterrupted (a signal stopped training after a checkpoint) with status 3 and the
command that resumes."""
from __future__ import annotations

from pathlib import Path

INTERRUPTED_STATUS = 3  # stopped by a signal after saving a checkpoint (130 is a bare KeyboardInterrupt)


class CifarlabError(Exception):
    """A problem with the user's input (a path, a file, a flag), described in one line: what and where."""


def unknown_name(kind: str, name: str, known: list[str]) -> CifarlabError:
    """'unknown model 'resnet2' (did you mean resnet20?); known: ...' for any registry of names."""
    import difflib

    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return CifarlabError(f"unknown {kind} '{name}'{hint}; known: {', '.join(sorted(known))}")


class RunInterrupted(Exception):
    """Training stopped on request after saving a checkpoint; the CLI prints how to resume."""

    def __init__(self, run_dir: Path, signal_name: str, where: str) -> None:
        super().__init__(f"stopped by {signal_name} {where}; saved {run_dir / 'checkpoint.pt'}")
        self.run_dir = run_dir
