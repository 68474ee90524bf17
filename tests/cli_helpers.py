"""Helpers shared by the command-line tests: write JSONL fixtures, run `jointrag` in-process, and
check that a user error is reported as one line with exit status 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

from jointrag.cli import EXIT_USER_ERROR, main


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(capsys, *argv, names: tuple[str, ...] = ()) -> str:
    """Exit status 2 and one `jointrag: error:` line, the last on stderr, without a traceback."""
    code, _, err = run(capsys, *argv)
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]  # tqdm bars may precede it
    assert lines and lines[-1].startswith("jointrag: error: "), err
    assert sum("jointrag: error" in line for line in lines) == 1
    for name in names:
        assert name in lines[-1], lines[-1]
    return lines[-1]
