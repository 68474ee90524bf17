"""BGM end to end (methods.md §5): the supervised stage, the PPO stage, then the comparison with
plain retrieval.

`jointrag train --method bgm` trains
- stage 1 (supervised) in RUN/sl: the bridge learns the silver passage sequences, computed once into
  `bgm.silver` (default RUN/silver.jsonl);
- stage 2 (PPO) in RUN/ppo: PPO from the stage-1 bridge, with the stage-1 bridge as the KL
  reference (`bgm.reference` = RUN/sl/checkpoint); RUN/ppo/checkpoint is the trained model (for
  `jointrag eval/ask --checkpoint`);
then answers the test split with the frozen LLM given the top-1 passage, the top `eval.k` passages,
the passages the SL bridge chooses from the top `eval.k`, and those the SL + PPO bridge chooses. EM,
F1, ROUGE-L and the mean number of passages passed go to RUN/comparison/table.{json,md,png}, beside each row's
predictions. A stage that already reached `train.steps` is not trained again, so `--resume` continues an
interrupted pipeline.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..io import read_tensors
from ..system import load_weights
from ._base import Stages, frozen, stage_config
from .bgm_bridge import bridge_answers, bridge_system, score_bridged

OUTPUTS = "sl/, ppo/ (ppo/checkpoint is the trained bridge), silver.jsonl and comparison/"


def run(config: Any, stages: Stages, methods: tuple[str, str]) -> dict:
    """Train both stages (`methods`: the supervised and the PPO stage) and return the comparison rows
    {row: test metrics}."""
    config = copy.deepcopy(config)
    config.bgm.silver = config.bgm.silver or str(Path(config.out) / "silver.jsonl")
    sl = stages.train(stage_config(config, methods[0], "sl"))
    ppo_stage = stage_config(config, methods[1], "ppo")
    ppo_stage.bgm.reference = str(sl)
    ppo = stages.train(ppo_stage)
    test, c = stages.test(), config.eval
    system = frozen(bridge_system(config))
    rows = {}
    for row, top, checkpoint in (("top-1 passage", 1, None), (f"top-{c.k} passages", c.k, None),
                                 ("SL bridge", None, sl), ("SL + PPO bridge", None, ppo)):
        if checkpoint is not None:
            load_weights(system, read_tensors(checkpoint / "weights.pt"), checkpoint)
        result = bridge_answers(system, test, k=c.k, num_beams=c.num_beams, max_new_tokens=c.max_new_tokens,
                                batch_size=c.batch_size, top=top)
        rows[row] = score_bridged(test, result)
    return stages.write_table(stages.out / "comparison", "BGM: plain retrieval vs the bridge (test split)", rows, ("em", "f1"))
