"""RA-DIT end to end (methods.md §4): both fine-tuning stages, then the paper's ablation.

`jointrag train --method ra-dit` trains, independently and from the same base models,
- LM-ft (`ra-dit-lm`) in RUN/lm-ft: the generator learns from retrieved background passages;
- R-ft (`ra-dit-lsr`) in RUN/r-ft: the query tower learns the frozen base LM's preferences;
then saves the combined model as RUN/checkpoint (usable by `jointrag eval/ask --checkpoint`) and
evaluates four models on the test split: base, LM-ft only, R-ft only, LM-ft + R-ft. The table goes to
RUN/ablation.{json,md,png} and each row's predictions to RUN/ablation/. A stage that already reached
`train.steps` is not trained again, so `--resume` continues an interrupted pipeline.
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
from pathlib import Path

import torch

from ..config import RunConfig, save_config
from ..data import embedded_examples, load_examples
from ..errors import UserError
from .build import system_from
from .loop import CHECKPOINT, Trainer, evaluate_system, load_weights

STAGES = (("ra-dit-lm", "lm-ft"), ("ra-dit-lsr", "r-ft"))
ROWS = ("base", "LM-ft only", "R-ft only", "LM-ft + R-ft")


def stage_config(config: RunConfig, method: str, directory: str) -> RunConfig:
    stage = copy.deepcopy(config)
    stage.method.name, stage.out = method, str(Path(config.out) / directory)
    return stage


def finished(config: RunConfig) -> bool:
    state = Path(config.out) / CHECKPOINT / "trainer.pt"
    return state.is_file() and torch.load(state, weights_only=False)["step"] >= config.train.steps


def save_combined(config: RunConfig, lm_ft: Path, r_ft: Path) -> Path:
    """RUN/checkpoint: LM-ft's generator weights and R-ft's query tower, written atomically."""
    out = Path(config.out)
    target, tmp = out / CHECKPOINT, out / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {**torch.load(lm_ft / "weights.pt", weights_only=True), **torch.load(r_ft / "weights.pt", weights_only=True)}
    torch.save(weights, tmp / "weights.pt")
    torch.save({"index": torch.load(r_ft / "trainer.pt", weights_only=False)["index"]}, tmp / "trainer.pt")
    save_config(config, tmp / "config.yaml")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def run_ra_dit(config: RunConfig, resume: bool = False) -> dict:
    """Train both stages, save the combined model, and return the ablation rows {row: test metrics}."""
    out = Path(config.out)
    if config.model.train_passage_tower:
        raise UserError("ra-dit: R-ft updates the query tower only (methods.md §4); set model.train_passage_tower=false")
    if (out / CHECKPOINT).exists() and not resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    checkpoints = {}
    for method, directory in STAGES:
        stage = stage_config(config, method, directory)
        if not finished(stage):
            Trainer(stage).run(resume=resume and (Path(stage.out) / CHECKPOINT).is_dir())
            gc.collect()
        checkpoints[directory] = Path(stage.out) / CHECKPOINT
    save_combined(config, checkpoints["lm-ft"], checkpoints["r-ft"])
    rows = ablation(config, checkpoints["lm-ft"], checkpoints["r-ft"])
    write_ablation(out, rows)
    return rows


def ablation(config: RunConfig, lm_ft: Path, r_ft: Path) -> dict:
    """Test metrics of the four models, from one system whose weights are swapped in place."""
    data = config.data
    test = load_examples(data.test, data.format) if data.test else embedded_examples("test")
    if config.eval.test_limit:
        test = test[: config.eval.test_limit]
    system = system_from(config, needs_posterior=False)
    system.requires_grad_(False)
    system.eval()
    base_query = {name: p.detach().clone() for name, p in system.named_parameters() if name.startswith("retriever.query_encoder.")}
    generator = torch.load(lm_ft / "weights.pt", weights_only=True)
    query = torch.load(r_ft / "weights.pt", weights_only=True)
    rows, out = {}, Path(config.out) / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    for row, weights in (("base", {}), ("R-ft only", query), ("LM-ft + R-ft", generator), ("LM-ft only", base_query)):
        load_weights(system, weights, r_ft if weights is query else lm_ft)
        predictions, metrics = evaluate_system(system, config, test)
        with open(out / f"{row.replace(' ', '').replace('+', '_')}.jsonl", "w") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        rows[row] = metrics
    return {row: rows[row] for row in ROWS}


def format_ablation(rows: dict) -> str:
    """A Markdown table: EM, F1 and the retrieval metrics of each row."""
    keys = ["em", "f1"] + [key for key in next(iter(rows.values())) if "recall" in key or key.startswith("mrr")]
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(f"{metrics.get(key, float('nan')):.2f}" for key in keys) + " |" for row, metrics in rows.items()]
    return "\n".join(lines)


def write_ablation(out: Path, rows: dict) -> None:
    from ..plot import plot_bars

    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    (out / "ablation.md").write_text(format_ablation(rows) + "\n")
    keys = [key for key in ("em", "f1", "gold_recall@1", "answer_recall@1") if key in next(iter(rows.values()))]
    plot_bars(out / "ablation.png", "RA-DIT ablation (test split)", {row: {k: m[k] for k in keys} for row, m in rows.items()})
