"""User-facing errors.

A `UserError` is a problem with the user's input (a file, a flag, a model path). The CLI prints its
message on one line and exits with status 2, without a traceback. Everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in the user's input; the message says what is wrong and where."""


def at(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format a location for an error message: `file.jsonl, line 3, field 'text'`."""
    where = str(path)
    if line is not None:
        where += f", line {line}"
    if field is not None:
        where += f", field '{field}'"
    return where


def local_path(name: str, what: str) -> "Path":
    """`name` as a local path; a name that looks like a path but does not exist is an error here,
    instead of being sent to the Hugging Face hub as a repository id."""
    from pathlib import Path

    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or path.suffix == ".gguf"
    if looks_local and not path.exists():
        raise UserError(f"cannot load {what} '{name}': no such file or directory")
    return path.resolve() if path.exists() else path
