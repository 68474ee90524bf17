"""RA-DIT end to end (methods.md §4): both fine-tuning stages, then the paper's ablation.

`jointrag train --method ra-dit` trains, independently and from the same base models,
- LM-ft (the registry's first stage) in RUN/lm-ft: the generator learns from retrieved background
  passages; corpus-derived examples are never mixed in here (their answers sit in their own passages);
- R-ft (the second stage) in RUN/r-ft: the query tower learns the frozen base LM's preferences;
then saves the combined model as RUN/checkpoint (usable by `jointrag eval/ask --checkpoint`) and
evaluates four models on the test split with `eval.decode`: base, LM-ft only, R-ft only, LM-ft + R-ft.
The table goes to RUN/ablation/DECODER/table.{json,md,png}, beside each row's predictions. A stage
that already reached `train.steps` is not trained again, so `--resume` continues an interrupted
pipeline, and `--resume --set eval.decode=...` adds the table of another decoder without training.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..io import read_tensors
from ..system import load_weights
from ._base import Stages, frozen, stage_config
from .systems import rag_system

ROWS = ("base", "LM-ft only", "R-ft only", "LM-ft + R-ft")
OUTPUTS = "checkpoint (LM-ft + R-ft), lm-ft/, r-ft/ and ablation/{decode}/"


def run(config: Any, stages: Stages, methods: tuple[str, str]) -> dict:
    """Train both stages (`methods`: LM-ft's and R-ft's), save the combined model, and return the
    ablation rows {row: test metrics}."""
    if config.model.train_passage_tower:
        raise UserError("ra-dit: R-ft updates the query tower only (methods.md §4); set model.train_passage_tower=false")
    lm_stage = stage_config(config, methods[0], "lm-ft")
    lm_stage.method.corpus_ratio = 0.0
    lm_ft = stages.train(lm_stage)
    r_ft = stages.train(stage_config(config, methods[1], "r-ft"))
    stages.combine([lm_ft, r_ft], r_ft, config)  # LM-ft's generator, R-ft's query tower
    system = frozen(rag_system(config))
    base_query = {name: p.detach().clone() for name, p in system.named_parameters() if name.startswith("retriever.query_encoder.")}
    generator = read_tensors(lm_ft / "weights.pt")
    query = read_tensors(r_ft / "weights.pt")
    rows = {}
    for row, weights in (("base", {}), ("R-ft only", query), ("LM-ft + R-ft", generator), ("LM-ft only", base_query)):
        load_weights(system, weights, r_ft if weights is query else lm_ft)
        rows[row] = stages.evaluate(system)
    return stages.write_table(stages.out / "ablation" / config.eval.decode, f"RA-DIT ablation (test split, {config.eval.decode})",
                              {row: rows[row] for row in ROWS}, ("em", "f1", "gold_recall@1", "answer_recall@1"))
