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
