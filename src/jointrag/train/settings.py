"""Training from Python: a config and keyword settings (`jointrag.train(config, **settings)`), with the
data given as examples in memory as well as files.

The loop reads its questions from files (`data.train`, `data.dev`, `data.test`), so that a run's
`config.yaml` says what it trained on and `--resume` finds the same data again. Examples given in
memory (a list, a `datasets.Dataset`) are therefore written to `OUT/data/NAME.jsonl` first, and the
setting names that file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import settings_config, setting_key
from ..data.qa import read_examples, save_examples
from ..io import check_out_dir
from .run import train

DATA_KEYS = ("data.train", "data.dev", "data.test")


def train_with(config: Any = None, *, resume: bool = False, **settings: Any) -> dict:
    """Train with `config.settings_config(config, settings)` and return the final metrics (a
    multi-stage method: its table, {row: metrics}). A data setting may hold examples rather than a path."""
    in_memory = {}
    for keyword in list(settings):
        value = settings[keyword]
        if setting_key(keyword) in DATA_KEYS and value is not None and not isinstance(value, (str, os.PathLike)):
            in_memory[setting_key(keyword)] = read_examples(settings.pop(keyword))
    run = settings_config(config, settings)
    if in_memory:
        check_out_dir(Path(run.out))
        files = {}
        for dotted, examples in in_memory.items():
            path = Path(run.out) / "data" / f"{dotted.split('.')[1]}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_examples(path, examples)
            files[dotted.replace(".", "__")] = str(path)
        run = settings_config(run, files)
    return train(run, resume=resume)
