"""A run's metrics log, `metrics.jsonl`, and its TensorBoard mirror, kept in step with its checkpoint.

A fresh run starts a fresh log: rows left by an earlier run killed before its first checkpoint would
otherwise mix with this run's. A resumed run keeps the rows up to its checkpoint's step and drops the
rest (the steps it is about to redo, and a line cut short by the kill), so every step appears once.
TensorBoard's events are rebuilt from the kept rows into one event file, for the same reason.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..io import whole_rows, write_jsonl

LOG, TENSORBOARD = "metrics.jsonl", "tensorboard"


def kept_rows(path: Path, step: int) -> list[dict]:
    """The rows of the log at `path` logged at or before `step`; a line that is not a whole row (the one a
    kill cut short) is dropped."""
    return [row for row in whole_rows(path) if isinstance(row.get("step"), int) and row["step"] <= step]


class RunLog:
    """Appends `{step, split, time, **values}` rows to RUN/metrics.jsonl and scalars to RUN/tensorboard."""

    def __init__(self, out: Path, resumed_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        path = out / LOG
        rows = kept_rows(path, resumed_step) if resumed_step is not None else []
        write_jsonl(path, rows)
        shutil.rmtree(out / TENSORBOARD, ignore_errors=True)
        self.writer = SummaryWriter(str(out / TENSORBOARD))
        for row in rows:
            self._scalars(row)
        self.file = open(path, "a", encoding="utf-8")

    def _scalars(self, row: dict) -> None:
        for key, value in row.items():
            if key not in ("step", "split", "time", "examples") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{row['split']}/{key}", value, row["step"])

    def record(self, step: int, split: str, values: dict) -> None:
        row = {"step": step, "split": split, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self._scalars(row)

    def close(self) -> None:
        self.writer.close()
        self.file.close()
