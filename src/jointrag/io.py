"""Reading and writing the plain files jointrag keeps: JSON Lines (with file:line errors), the
header-checked caches of precomputed scores, YAML files of dataclass fields (templates), and the
tensor files of a checkpoint.

Nothing here runs code from a file: JSON only, YAML through `safe_load`, and tensor files through
`torch.load(weights_only=True)`, whose unpickler builds tensors and plain values (numbers, strings,
lists, tuples, dicts) and refuses everything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, at


def _python_type_name(value: Any) -> str:
    return type(value).__name__


def jsonl_records(
    path: Path,
    lines: str | Iterable[str],
    *,
    objects: bool = False,
    type_name: Callable[[Any], str] = _python_type_name,
    invalid: str = "invalid JSON: {}",
) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of JSON Lines read from `path`.

    `lines` is the whole text (split with `str.splitlines`) or an iterable of lines, such as an open
    file, which is then read one line at a time: a file of any size streams through. Every error is
    a UserError at `path, line N`: a line that is not JSON says `invalid` with the parser's message
    in place of `{}`; with `objects`, a value that is not a JSON object says `expected a JSON
    object, got ` and its `type_name`.
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{at(path, line_no)}: {invalid.format(e.msg)}") from e
        if objects and not isinstance(value, dict):
            raise UserError(f"{at(path, line_no)}: expected a JSON object, got {type_name(value)}")
        yield line_no, value


def whole_rows(path: Path) -> list[dict]:
    """The JSON-object lines of a log that a killed writer may have left (none if there is no file): a
    line cut short, or anything else that is not a whole object, is dropped, not an error."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_tensors(path: str | Path, mmap: bool = False) -> Any:
    """The tensors and plain values of a file written by `torch.save`, on the CPU (`mmap`: memory-mapped,
    read only where used); a UserError for a file that holds anything else (a pickled object, whose
    loading could run code) or is damaged."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing")
    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise UserError(f"{path}: refused: it holds more than tensors and plain values, and loading it could run code "
                        f"({reason})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise UserError(f"{path}: unreadable, truncated or not a tensor file ({str(error).strip().splitlines()[0]})") from None


def check_tensor_file(path: str | Path) -> None:
    """Refuse, cheaply and before any model loads, a tensor file that is missing or cut short: `torch.save`
    writes a zip archive whose directory is at its end, so a truncated file has none. Only the directory
    is read; `read_tensors` still checks the contents when the file is loaded."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing")
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as error:
        raise UserError(f"{path}: unreadable, truncated or not a tensor file ({error})") from None


@contextlib.contextmanager
def atomic_text(path: str | Path):
    """An open text file that replaces `path` only once it is whole: written to a temporary file then
    renamed, so a reader (or a killed writer) never sees half a file and the old one stays until then."""
    path = Path(path)
    remove_abandoned(path.parent, f".{path.name}.tmp-")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    with atomic_text(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path: str | Path, value: Any) -> None:
    with atomic_text(path) as f:
        f.write(json.dumps(value, indent=2))


def remove_abandoned(directory: Path, prefix: str) -> None:
    """Remove the `prefix<PID>` files and directories in `directory` whose process no longer runs: the
    temporaries of a killed build or write (a running one's are left alone)."""
    for entry in directory.glob(f"{glob.escape(prefix)}*"):
        pid = entry.name[len(prefix):]
        if pid.isdigit() and not process_runs(int(pid)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def staging_directory(out: Path) -> Path:
    """A fresh, empty temporary sibling of `out` (`.NAME.tmp-PID`) to build a directory in before it is
    moved into place; the temporaries and swapped-out copies (`.NAME.old-PID`) of killed processes go first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in (f".{out.name}.tmp-", f".{out.name}.old-"):
        remove_abandoned(out.parent, leftover)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def swap_in(new: Path, target: Path) -> None:
    """Move the complete directory `new` into place as `target`: an existing `target` is renamed aside
    first and removed after, so `target` is always one whole version, never a mix."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
    else:
        new.rename(target)


def process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def check_out_dir(out: Path, what: str = "--out") -> None:
    """Refuse, before any work, an output directory that is a file or cannot be created or written
    (it lies under a file, or under a directory this user cannot write)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} exists and is not a directory")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {out}: cannot create or write it ({existing} is not a writable directory)")


LOCK = ".jointrag.lock"


@contextlib.contextmanager
def exclusive(directory: str | Path, what: str = "--out"):
    """Hold `directory` (created if missing) for one writer: a second jointrag process writing into it
    is refused at once, naming the holder's pid. The lock is the kernel's (`flock`), so a killed holder
    releases it. A directory this call created is removed again if the work fails before writing in it."""
    import fcntl

    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UserError(f"{what} {directory}: another jointrag process (pid {holder}) is writing there; "
                            "wait for it to finish or choose another directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield directory
        except BaseException:
            if created and {p.name for p in directory.iterdir()} <= {LOCK}:
                shutil.rmtree(directory, ignore_errors=True)
            raise
    finally:
        handle.close()


def read_cache(path: Path, header: dict, remedy: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each record of a cache file written by `write_cache`, once its first
    line is checked against `header`: a file made with other settings is refused, suggesting `remedy`."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line_no}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_no}: expected a JSON object")
            if line_no > 1:
                yield line_no, record
                continue
            for key, value in header.items():
                if record.get(key) != value:
                    raise UserError(f"{path}:1: field '{key}' is {record.get(key)!r}, this run needs {value!r}; "
                                    f"delete the file or {remedy}")


def write_cache(path: Path, header: dict, records: dict[str, dict]) -> None:
    """`header` on the first line, then `{"id": key, **record}` a line, written atomically (a temporary
    file renamed over the old one), so a failed run leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_text(path) as f:
        f.write(json.dumps(header) + "\n")
        for key, record in records.items():
            f.write(json.dumps({"id": key, **record}, ensure_ascii=False) + "\n")


def load_fields(path: str, cls, placeholders: dict, required: tuple[str, ...] = ()):
    """A `cls` (a dataclass of templates and settings) from a YAML mapping of some of its fields: each
    value must have its default's type, and each template field may use only its `placeholders`."""
    try:
        fields = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"cannot read template file {path}: {' '.join(str(error).split())}") from None
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    if not isinstance(fields, dict) or not fields.keys() <= defaults.keys() or not set(required) <= fields.keys():
        optional = sorted(defaults.keys() - set(required))
        wanted = f"{', '.join(map(repr, required))} and optionally" if required else "some of"
        raise UserError(f"{path}: expected a mapping with {wanted} {optional}")
    for name, value in fields.items():
        if type(value) is not type(defaults[name]):
            raise UserError(f"{path}, field '{name}': expected {type(defaults[name]).__name__}, got {value!r}")
    for name, samples in placeholders.items():
        try:
            fields.get(name, "").format(**samples)
        except (KeyError, IndexError, ValueError) as error:
            allowed = ", ".join(f"{{{key}}}" for key in samples)
            raise UserError(f"{path}, field '{name}': bad placeholder {error}; it may use {allowed}") from None
    return cls(**fields)


def names(value: str) -> list[str]:
    """The items of a comma-separated setting, e.g. bgm.metrics 'em,f1' -> ['em', 'f1']."""
    return [item.strip() for item in value.split(",") if item.strip()]
