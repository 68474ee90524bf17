"""RA-DIT end to end (methods.md §4): both fine-tuning stages, then the paper's ablation.

`jointrag train --method ra-dit` trains, independently and from the same base models,
- LM-ft (`ra-dit-lm`) in RUN/lm-ft: the generator learns from retrieved background passages;
- R-ft (`ra-dit-lsr`) in RUN/r-ft: the query tower learns the frozen base LM's preferences;
then saves the combined model as RUN/checkpoint (usable by `jointrag eval/ask --checkpoint`) and
evaluates four models on the test split with `eval.decode`: base, LM-ft only, R-ft only, LM-ft + R-ft.
The table goes to RUN/ablation/DECODER/table.{json,md,png}, beside each row's predictions. A stage
that already reached `train.steps` is not trained again, so `--resume` continues an interrupted
pipeline, and `--resume --set eval.decode=...` adds the table of another decoder without training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import UserError
from .build import load_weights, system_from
from .loop import evaluate_system
from .pipeline import run_stage, save_combined, save_predictions, stage_config, start, test_split, write_table

STAGES = (("ra-dit-lm", "lm-ft"), ("ra-dit-lsr", "r-ft"))
ROWS = ("base", "LM-ft only", "R-ft only", "LM-ft + R-ft")


def run_ra_dit(config: RunConfig, resume: bool = False) -> dict:
    """Train both stages, save the combined model, and return the ablation rows {row: test metrics}."""
    if config.model.train_passage_tower:
        raise UserError("ra-dit: R-ft updates the query tower only (methods.md §4); set model.train_passage_tower=false")
    out = start(config, resume, [directory for _, directory in STAGES])
    checkpoints = {directory: run_stage(stage_config(config, method, directory), resume) for method, directory in STAGES}
    save_combined(out, [checkpoints["lm-ft"], checkpoints["r-ft"]], checkpoints["r-ft"], config)  # LM-ft's generator, R-ft's query tower
    table = out / "ablation" / config.eval.decode
    rows = ablation(config, checkpoints["lm-ft"], checkpoints["r-ft"], table)
    write_table(table, f"RA-DIT ablation (test split, {config.eval.decode})", rows, ("em", "f1", "gold_recall@1", "answer_recall@1"))
    return rows


def ablation(config: RunConfig, lm_ft: Path, r_ft: Path, table: Path) -> dict:
    """Test metrics of the four models, from one system whose weights are swapped in place; their
    predictions go to `table`."""
    test = test_split(config)
    system = system_from(config, needs_posterior=False)
    system.requires_grad_(False)
    system.eval()
    base_query = {name: p.detach().clone() for name, p in system.named_parameters() if name.startswith("retriever.query_encoder.")}
    generator = torch.load(lm_ft / "weights.pt", weights_only=True)
    query = torch.load(r_ft / "weights.pt", weights_only=True)
    rows = {}
    for row, weights in (("base", {}), ("R-ft only", query), ("LM-ft + R-ft", generator), ("LM-ft only", base_query)):
        load_weights(system, weights, r_ft if weights is query else lm_ft)
        predictions, rows[row] = evaluate_system(system, config, test)
        save_predictions(table, row, predictions)
    return {row: rows[row] for row in ROWS}
