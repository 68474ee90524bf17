"""BGM end to end (methods.md §5): the supervised stage, the PPO stage, then the comparison with
plain retrieval.

`jointrag train --method bgm` trains
- stage 1 (`bgm-sl`) in RUN/sl: the bridge learns the silver passage sequences, computed once into
  `bgm.silver` (default RUN/silver.jsonl);
- stage 2 (`bgm-ppo`) in RUN/ppo: PPO from the stage-1 bridge, with the stage-1 bridge as the KL
  reference (`bgm.reference` = RUN/sl/checkpoint); RUN/ppo/checkpoint is the trained model (for
  `jointrag eval/ask --checkpoint`);
then answers the test split with the frozen LLM given the top-1 passage, the top `eval.k` passages,
the passages the SL bridge chooses from the top `eval.k`, and those the SL + PPO bridge chooses. EM,
F1 and the mean number of passages passed go to RUN/bgm/table.{json,md,png}, beside each row's
predictions. A stage that already reached `train.steps` is not trained again, so `--resume` continues an
interrupted pipeline.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..bgm import bridge_answers, score_bridged
from ..config import RunConfig
from .build import bridge_system_from, load_weights
from .pipeline import run_stage, save_predictions, stage_config, start, test_split, write_table


def run_bgm(config: RunConfig, resume: bool = False) -> dict:
    """Train both stages and return the comparison rows {row: test metrics}."""
    config = copy.deepcopy(config)
    config.bgm.silver = config.bgm.silver or str(Path(config.out) / "silver.jsonl")
    out = start(config, resume, ["sl", "ppo"])
    sl = run_stage(stage_config(config, "bgm-sl", "sl"), resume)
    ppo_stage = stage_config(config, "bgm-ppo", "ppo")
    ppo_stage.bgm.reference = str(sl)
    ppo = run_stage(ppo_stage, resume)
    rows = comparison(config, sl, ppo)
    write_table(out / "bgm", "BGM: plain retrieval vs the bridge (test split)", rows, ("em", "f1"))
    return rows


def comparison(config: RunConfig, sl: Path, ppo: Path) -> dict:
    """Test metrics of plain retrieval (top-1, top-k) and of the two bridges, from one system whose
    bridge weights are swapped in place."""
    test, c, out = test_split(config), config.eval, Path(config.out)
    system = bridge_system_from(config, reference=False)
    system.requires_grad_(False)
    rows = {}
    for row, top, checkpoint in (("top-1 passage", 1, None), (f"top-{c.k} passages", c.k, None),
                                 ("SL bridge", None, sl), ("SL + PPO bridge", None, ppo)):
        if checkpoint is not None:
            load_weights(system, torch.load(checkpoint / "weights.pt", weights_only=True), checkpoint)
        result = bridge_answers(system, test, k=c.k, num_beams=c.num_beams, max_new_tokens=c.max_new_tokens,
                                batch_size=c.batch_size, top=top)
        predictions, rows[row] = score_bridged(test, result)
        save_predictions(out / "bgm", row, predictions)
    return rows
