"""What the two-stage pipelines (RA-DIT, BGM) share: each stage is an ordinary run in RUN/<stage>,
skipped once it reached `train.steps` (so `--resume` continues an interrupted pipeline); the final
table is computed on the test split and written to a directory as table.{json,md,png}, beside each
row's predictions.
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
from pathlib import Path

import torch

from ..config import RunConfig, save_config
from ..data import embedded_examples, load_examples, write_jsonl
from ..errors import UserError
from ..types import Example
from .loop import CHECKPOINT, Trainer


def start(config: RunConfig, resume: bool, stages: list[str]) -> Path:
    """RUN, with the pipeline's config.yaml; a run already there is refused unless `resume`."""
    out = Path(config.out)
    if not resume and any((out / d / CHECKPOINT).exists() for d in ["", *stages]):
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    return out


def stage_config(config: RunConfig, method: str, directory: str) -> RunConfig:
    stage = copy.deepcopy(config)
    stage.method.name, stage.out = method, str(Path(config.out) / directory)
    return stage


def finished(config: RunConfig) -> bool:
    state = Path(config.out) / CHECKPOINT / "trainer.pt"
    return state.is_file() and torch.load(state, weights_only=False)["step"] >= config.train.steps


def run_stage(stage: RunConfig, resume: bool) -> Path:
    """Train the stage unless it is finished; its checkpoint."""
    checkpoint = Path(stage.out) / CHECKPOINT
    if not finished(stage):
        Trainer(stage).run(resume=resume and checkpoint.is_dir())
        gc.collect()
    return checkpoint


def save_combined(out: Path, stages: list[Path], index_from: Path, config: RunConfig) -> Path:
    """out/checkpoint: the trained weights of the `stages`' checkpoints together, the index of
    `index_from`'s and `config`, written beside the old one and swapped in."""
    target, tmp = out / CHECKPOINT, out / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {name: w for stage in stages for name, w in torch.load(stage / "weights.pt", weights_only=True).items()}
    torch.save(weights, tmp / "weights.pt")
    torch.save({"index": torch.load(index_from / "trainer.pt", weights_only=False)["index"]}, tmp / "trainer.pt")
    save_config(config, tmp / "config.yaml")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def test_split(config: RunConfig) -> list[Example]:
    """`data.test` (default: the embedded test split), its first `eval.test_limit`."""
    data = config.data
    test = load_examples(data.test, data.format) if data.test else embedded_examples("test")
    return test[: config.eval.test_limit] if config.eval.test_limit else test


def save_predictions(directory: Path, row: str, predictions: list[dict]) -> None:
    """directory/<row>.jsonl, the row's name without spaces and with '+' as '_'."""
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(directory / f"{row.replace(' ', '').replace('+', '_')}.jsonl", predictions)


def format_table(rows: dict) -> str:
    """A Markdown table of {row: metrics}: EM, F1, then every other metric but the counts."""
    first = next(iter(rows.values()))
    keys = ["em", "f1"] + [key for key in first if key not in ("em", "f1", "examples", "k")]
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(f"{metrics.get(key, float('nan')):.2f}" for key in keys) + " |" for row, metrics in rows.items()]
    return "\n".join(lines)


def write_table(directory: Path, title: str, rows: dict, plotted: tuple[str, ...]) -> None:
    """directory/table.json and table.md, and the `plotted` metrics as bars in directory/table.png."""
    from ..plot import plot_bars

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "table.json").write_text(json.dumps(rows, indent=2))
    (directory / "table.md").write_text(format_table(rows) + "\n")
    keys = [key for key in plotted if key in next(iter(rows.values()))]
    plot_bars(directory / "table.png", title, {row: {k: m[k] for k in keys} for row, m in rows.items()})
