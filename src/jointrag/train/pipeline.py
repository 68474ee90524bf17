"""The stages a multi-stage method's pipeline runs (RA-DIT, BGM, Invar-RAG; `methods._base.Stages`).

Each stage is an ordinary run in RUN/<stage>, skipped once it reached `train.steps` (so `--resume`
continues an interrupted pipeline); the final table is computed on the test split and written to a
directory as table.{json,md,png}, beside each row's predictions.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..config import RunConfig, save_config
from ..errors import UserError
from ..evaluation.plot import plot_bars
from ..io import read_tensors, write_json, write_jsonl
from ..methods._base import CHECKPOINT
from ..types import Example
from .build import held_out
from .loop import Trainer, evaluate_system, load_trained


class Stages:
    """The `methods._base.Stages` of the pipeline run `config` in RUN = `config.out`; a run already
    there is refused unless `resume`."""

    def __init__(self, config: RunConfig, resume: bool):
        self.config, self.resume, self.out = config, resume, Path(config.out)
        if not resume and ((self.out / CHECKPOINT).exists() or any(self.out.glob(f"*/{CHECKPOINT}"))):
            raise UserError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(config, self.out / "config.yaml")
        self._test: list[Example] | None = None

    def train(self, stage: RunConfig) -> Path:
        checkpoint = Path(stage.out) / CHECKPOINT
        if not finished(stage):
            Trainer(stage).run(resume=self.resume and checkpoint.is_dir())
            gc.collect()
        return checkpoint

    def combine(self, checkpoints: Sequence[Path], index_from: Path, config: RunConfig) -> Path:
        """RUN/checkpoint: the trained weights of `checkpoints` together, the index of `index_from`'s and
        `config`, written beside the old one and swapped in."""
        target, tmp = self.out / CHECKPOINT, self.out / f"{CHECKPOINT}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {name: w for stage in checkpoints for name, w in read_tensors(stage / "weights.pt").items()}
        torch.save(weights, tmp / "weights.pt")
        torch.save({"index": read_tensors(index_from / "trainer.pt")["index"]}, tmp / "trainer.pt")
        save_config(config, tmp / "config.yaml")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target

    def load(self, checkpoint: Path) -> nn.Module:
        return load_trained(checkpoint)[1]

    def test(self) -> list[Example]:
        """`data.test` (`build.held_out`), its first `eval.test_limit`."""
        if self._test is None:
            limit = self.config.eval.test_limit
            test = held_out(self.config, "test")
            self._test = test[:limit] if limit else test
        return self._test

    def evaluate(self, system: nn.Module) -> tuple[list[dict], dict]:
        return evaluate_system(system, self.config, self.test())

    def write_table(self, directory: Path, title: str, rows: dict[str, tuple[list[dict], dict]], plotted: Sequence[str]) -> dict:
        """directory/<row>.jsonl (the row's name without spaces and with '+' as '_'), table.json, table.md
        and the `plotted` metrics as bars in table.png; returns {row: metrics}."""
        directory.mkdir(parents=True, exist_ok=True)
        for row, (predictions, _) in rows.items():
            write_jsonl(directory / f"{row.replace(' ', '').replace('+', '_')}.jsonl", predictions)
        table = {row: metrics for row, (_, metrics) in rows.items()}
        write_json(directory / "table.json", table)
        (directory / "table.md").write_text(format_table(table) + "\n")
        keys = [key for key in plotted if key in next(iter(table.values()))]
        plot_bars(directory / "table.png", title, {row: {k: m[k] for k in keys} for row, m in table.items()})
        return table


def finished(config: RunConfig) -> bool:
    state = Path(config.out) / CHECKPOINT / "trainer.pt"
    return state.is_file() and read_tensors(state)["step"] >= config.train.steps


def format_table(rows: dict) -> str:
    """A Markdown table of {row: metrics}: EM, F1, then every other metric but the counts."""
    first = next(iter(rows.values()))
    keys = ["em", "f1"] + [key for key in first if key not in ("em", "f1", "examples", "k")]
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(f"{metrics.get(key, float('nan')):.2f}" for key in keys) + " |" for row, metrics in rows.items()]
    return "\n".join(lines)
