"""The one exception type a user sees: the CLI prints its message on one line and exits with status 2."""


class CifarlabError(Exception):
    """A problem with the user's input (a path, a file, a flag), described in one line: what and where."""


def unknown_name(kind: str, name: str, known: list[str]) -> CifarlabError:
    """'unknown model 'resnet2' (did you mean resnet20?); known: ...' for any registry of names."""
    import difflib

    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return CifarlabError(f"unknown {kind} '{name}'{hint}; known: {', '.join(sorted(known))}")
